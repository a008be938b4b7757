#!/usr/bin/env bash
# The Kubernetes manifests (k8s/), offline: every object validates strictly against the
# Kubernetes API schemas (kubernetes-validate --strict: unknown fields are errors), the
# kustomization lists every manifest, names refer to defined objects, no secret is in clear,
# mount options are aquifer mount flags (integration/k8s_check.py). Each check is also shown
# to fail on a broken copy.
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
note "kustomization complete, references defined, no secret in clear, mount options known"

# The checks see a secret in clear, an unknown mount option and a missing reference.
cp -r "$k8s" "$WORK/k8s-bad"
sed -i 's/secret-key: REPLACE_WITH_SECRET_KEY/secret-key: wJalrXUtnFEMI/' "$WORK/k8s-bad/secret.yaml"
sed -i 's/- upload-limit=800/- upload-limit-mbps=800/; s/namespace}_\${pvc/namespace}-${pvc/' "$WORK/k8s-bad/storageclasses.yaml"
sed -i 's/claimName: checkpoints/claimName: checkpoint/' "$WORK/k8s-bad/examples/training.yaml"
sed -i 's/profileName: aquifer/profileName: aquifer-fuse/; s/cache-size: 200G/cache-quota: 200G/' "$WORK/k8s-bad/examples/fluid.yaml"
sed -i 's/limits: {memory: 2304Mi}/limits: {memory: 1280Mi}/; s|--specs-dir=/run/aquifer-csi/specs|--specs-dir=/run/aquifer/specs|' "$WORK/k8s-bad/mounter.yaml"
sed -i 's/key: warm.aquifer.dev\/datasets.default_imagenet/key: warm.aquifer.dev\/imagenet/; 0,/mountPropagation: HostToContainer/{/mountPropagation: HostToContainer/d}' "$WORK/k8s-bad/examples/training.yaml"
out=$(python3 "$here/k8s_check.py" "$WORK/k8s-bad" "$AQUIFER") && fail "a broken copy passed the checks"
for what in "secret-key holds a value" "upload-limit-mbps" "PersistentVolumeClaim default/checkpoint" \
  "ThinRuntimeProfile aquifer-fuse" "cache-quota" "prefers warm.aquifer.dev/imagenet" "does not follow the host" \
  "memory limit 1280Mi is below" "disagree on --specs-dir" "two claims can share a directory"; do
  grep -q "$what" <<<"$out" || fail "the checks missed: $what"
done
echo "  ok"
