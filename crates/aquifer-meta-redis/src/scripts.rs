//! The Lua scripts the server runs: the commit of a transaction (check what was read, then
//! write, or do nothing) and the lookup of an entry with its inode's attributes. Kept as
//! source here; `RedisKv` holds each as a `redis::Script` (run with `EVALSHA`, loaded when
//! the server lacks it), except a commit inside `MULTI`/`EXEC`, which sends `COMMIT`'s source
//! with `EVAL` (commit.rs).

/// A transaction's commit, run by the server: check that every value the transaction read
/// (or guessed) is still what it saw, then apply its writes — or apply nothing and answer 0.
///
/// `ARGV[1]` is the number of checks; each check is five arguments: `s` (string) or `h`
/// (hash field), the key, the field (empty for a string), `1` and the value it must hold, or
/// `0` and anything when it must be absent. The writes follow, each an op code and its
/// arguments: `S key value`, `D key`, `H key field value`, `X key field` (HDEL), `A key n`
/// (INCRBY), `Z index id` (ZADD), `R index id` (ZREM), `U key index id` (drop a group's id
/// from its index once the group's hash is gone), and `L stream counter maxlen keys` (append
/// the commit's followed keys to the change feed under the next sequence number: feed.rs).
pub(crate) const COMMIT: &str = r"
local i = 2
for _ = 1, tonumber(ARGV[1]) do
  local cur
  if ARGV[i] == 'h' then cur = redis.call('HGET', ARGV[i+1], ARGV[i+2])
  else cur = redis.call('GET', ARGV[i+1]) end
  if ARGV[i+3] == '1' then
    if cur ~= ARGV[i+4] then return 0 end
  elseif cur then return 0 end
  i = i + 5
end
local n = #ARGV
while i <= n do
  local op = ARGV[i]
  if op == 'H' then redis.call('HSET', ARGV[i+1], ARGV[i+2], ARGV[i+3]) i = i + 4
  elseif op == 'X' then redis.call('HDEL', ARGV[i+1], ARGV[i+2]) i = i + 3
  elseif op == 'S' then redis.call('SET', ARGV[i+1], ARGV[i+2]) i = i + 3
  elseif op == 'D' then redis.call('DEL', ARGV[i+1]) i = i + 2
  elseif op == 'A' then redis.call('INCRBY', ARGV[i+1], ARGV[i+2]) i = i + 3
  elseif op == 'Z' then redis.call('ZADD', ARGV[i+1], 0, ARGV[i+2]) i = i + 3
  elseif op == 'R' then redis.call('ZREM', ARGV[i+1], ARGV[i+2]) i = i + 3
  elseif op == 'U' then
    if redis.call('EXISTS', ARGV[i+1]) == 0 then redis.call('ZREM', ARGV[i+2], ARGV[i+3]) end
    i = i + 4
  elseif op == 'L' then
    local seq = redis.call('INCR', ARGV[i+2])
    redis.call('XADD', ARGV[i+1], 'MAXLEN', '~', ARGV[i+3], '*', 's', seq, 'k', ARGV[i+4])
    i = i + 5
  else return redis.error_reply('aquifer commit: unknown op') end
end
return 1
";

/// A lookup in one round trip (`KvRead::get_entry_attr`): the entry in `KEYS[1]`, field
/// `ARGV[1]`, then the attributes of the inode it names, in the hash `ARGV[2]` + ino / 64,
/// field ino % 64 (`ATTR_BUCKET`, keys.rs).
pub(crate) const ENTRY_ATTR: &str = r"
local d = redis.call('HGET', KEYS[1], ARGV[1])
if not d then return {false, false} end
if string.len(d) ~= 9 then return {d, false} end
local low = string.byte(d, 9)
return {d, redis.call('HGET', ARGV[2] .. string.sub(d, 2, 8) .. string.char(math.floor(low / 64)),
  string.char(low % 64))}
";
