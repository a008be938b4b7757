#!/usr/bin/env bash
# The Kubernetes manifests (k8s/), offline: every object validates strictly against the
# Kubernetes API schemas (kubernetes-validate --strict: unknown fields are errors), the
# kustomization lists every manifest, names refer to defined objects, no secret is in clear,
# mount options are aquifer mount flags, cache nodes run `aquifer cache-node` in a group a
# StorageClass joins, probed where their metrics are (integration/k8s_check.py). Each check
# is also shown to fail on a broken copy.
source "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
k8s=$here/../k8s
command -v kubernetes-validate >/dev/null || fail "kubernetes-validate is missing (scripts/install-deps.sh --test)"

files=()
for f in "$k8s"/*.yaml "$k8s"/examples/*.yaml; do
  # Fluid's objects have no schema here (k8s_check.py checks them).
  case "$(basename "$f")" in kustomization.yaml | fluid.yaml) ;; *) files+=("$f") ;; esac
done
kubernetes-validate --strict --quiet "${files[@]}" || fail "manifests do not validate"
note "${#files[@]} manifests validate strictly"

# The validator sees an unknown field.
sed 's/^  updateStrategy:/  updateStrategy:\n    maxSurgeOfPods: 1/' "$k8s/node.yaml" >"$WORK/bad-node.yaml"
grep -q maxSurgeOfPods "$WORK/bad-node.yaml" || fail "could not break the copy"
if kubernetes-validate --strict --quiet "$WORK/bad-node.yaml" >/dev/null 2>&1; then
  fail "an unknown field passed strict validation"
fi

python3 "$here/k8s_check.py" "$k8s" "$AQUIFER" || fail "manifest checks"
note "kustomization complete, references defined, no secret in clear, mount options known, cache nodes in a joined group"

# The checks see a secret in clear, an unknown mount option and a missing reference.
cp -r "$k8s" "$WORK/k8s-bad"
sed -i 's/secret-key: REPLACE_WITH_SECRET_KEY/secret-key: wJalrXUtnFEMI/' "$WORK/k8s-bad/secret.yaml"
sed -i 's/- upload-limit=800/- upload-limit-mbps=800/; s/namespace}_\${pvc/namespace}-${pvc/' "$WORK/k8s-bad/storageclasses.yaml"
sed -i 's/claimName: checkpoints/claimName: checkpoint/' "$WORK/k8s-bad/examples/training.yaml"
sed -i 's/profileName: aquifer/profileName: aquifer-fuse/; s/cache-size: 200G/cache-quota: 200G/' "$WORK/k8s-bad/examples/fluid.yaml"
sed -i 's/limits: {memory: 3584Mi}/limits: {memory: 1280Mi}/; s|--specs-dir=/run/aquifer-csi/specs|--specs-dir=/run/aquifer/specs|' "$WORK/k8s-bad/mounter.yaml"
sed -i 's/key: warm.aquifer.dev\/datasets.default_imagenet/key: warm.aquifer.dev\/imagenet/; 0,/mountPropagation: HostToContainer/{/mountPropagation: HostToContainer/d}' "$WORK/k8s-bad/examples/training.yaml"
# The cache nodes: in a group no class joins (and the Fluid Dataset that reads through them
# left without owners), metrics on loopback where the probes cannot reach them, a flag
# cache-node does not take, a Secret key that is not there, the cache off the host path, too
# little memory, a password in the script; and a class's group name that is none.
sed -i 's/--cache-group=datasets/--cache-group=dataset/; s/--metrics=0.0.0.0:9567/--metrics=127.0.0.1:9567/;
  s/--cache-size=1T/--cache-quota=1T/; s/key: metaurl/key: meta-url/;
  s|mountPath: /var/lib/aquifer-cache-node|mountPath: /var/lib/aquifer-cache|;
  s/limits: {memory: 1408Mi}/limits: {memory: 1200Mi}/; s/META_PASSWORD=\${userinfo#\*:}/META_PASSWORD=hunter2/' \
  "$WORK/k8s-bad/examples/cache-nodes.yaml"
sed -i 's|- cache-group=datasets|- cache-group=datasets/eu|' "$WORK/k8s-bad/storageclasses.yaml"
out=$(python3 "$here/k8s_check.py" "$WORK/k8s-bad" "$AQUIFER") && fail "a broken copy passed the checks"
for what in "secret-key holds a value" "upload-limit-mbps" "PersistentVolumeClaim default/checkpoint" \
  "ThinRuntimeProfile aquifer-fuse" "cache-quota=200G" "prefers warm.aquifer.dev/imagenet" "does not follow the host" \
  "memory limit 1280Mi is below" "disagree on --specs-dir" "two claims can share a directory" \
  "cache node group dataset is joined by no StorageClass" "joins group datasets owning nothing" \
  "readinessProbe asks port 9567, but --metrics serves 127.0.0.1:9567" "cache-node option --cache-quota" \
  "Secret aquifer-volume has no key meta-url" "cache dir /var/lib/aquifer-cache-node is not on a host path" \
  "cache node's memory limit 1200Mi is below" "aquifer-cache-node: looks like a secret in clear" \
  "'cache-group=datasets/eu' is not a group name"; do
  grep -q "$what" <<<"$out" || fail "the checks missed: $what"
done
echo "  ok"
