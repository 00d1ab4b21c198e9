#!/usr/bin/env bash
# Renders every kustomization under DIR (default: deploy/k8s) with
# `kubectl kustomize` and validates every object offline (validate.py:
# Kubernetes' OpenAPI schemas in strict mode, the vendored JobSet and
# PodMonitor CRD schemas). With --self-test it also proves that broken
# manifests fail: a wrong field, a wrong type and a missing required field,
# in a built-in object and in the JobSet, each in its own copy of DIR.
#
#   deploy/k8s/validate.sh [DIR] [--self-test]
#
# Needs kubectl (for its kustomize) and python3; installs kubernetes-validate
# into a virtual environment (deploy/k8s/.venv) on first use.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DIR=$HERE
SELF_TEST=0
for a in "$@"; do
  case "$a" in
    --self-test) SELF_TEST=1 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) DIR=$(cd "$a" && pwd) ;;
  esac
done
command -v kubectl >/dev/null || { echo "kubectl is required (its built-in kustomize renders the manifests)" >&2; exit 1; }
VENV=${K8S_VALIDATE_VENV:-$HERE/.venv}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import kubernetes_validate" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "kubernetes-validate==1.37.0" "jsonschema>=4.18" "pyyaml>=6"
fi

# Validates every renderable kustomization under $1; returns 1 if any fails.
check() {
  local root=$1 bad=0 k dir
  while IFS= read -r k; do
    dir=$(dirname "$k")
    # Components are only rendered through the overlays that use them.
    grep -q '^kind: Component' "$k" && continue
    echo "== ${dir#$root/}"
    if ! kubectl kustomize "$dir" | "$VENV/bin/python" "$HERE/validate.py"; then
      bad=1
    fi
  done < <(find "$root" -name kustomization.yaml -not -path '*/.venv/*' | sort)
  return $bad
}

check "$DIR"
echo "every manifest under $DIR is valid"

if [ "$SELF_TEST" = 1 ]; then
  # Each breakage must make validation fail, naming the field.
  breakages=(
    "base/jobset.yaml|s/successPolicy:/sucessPolicy:/|sucessPolicy"
    "base/jobset.yaml|s/      replicas: 1/      replicas: one/|replicas"
    "base/jobset.yaml|s/^    - name: coordinator$/    - title: coordinator/|'name' is a required"
    "plain/coordinator.yaml|s/      port: 50051/      port: [50051]/|port"
    "plain/coordinator.yaml|s/      port: 50051/      number: 50051/|'port' is a required"
    "common/storage.yaml|s/accessModes:/acessModes:/|acessModes"
    "components/sharded/kustomization.yaml|s/completionMode: Indexed/completionMod: Indexed/|completionMod"
  )
  for b in "${breakages[@]}"; do
    IFS='|' read -r file edit needle <<<"$b"
    copy=$(mktemp -d)
    cp -r "$DIR/." "$copy/"
    rm -rf "$copy/.venv"
    sed -i "$edit" "$copy/$file"
    if cmp -s "$DIR/$file" "$copy/$file"; then
      echo "self-test: the edit '$edit' changed nothing in $file" >&2; exit 1
    fi
    if out=$(check "$copy" 2>&1); then
      echo "self-test: a broken $file ($edit) passed validation" >&2; exit 1
    fi
    grep -q "INVALID.*$needle" <<<"$out" || { echo "self-test: no error naming '$needle' for $edit:" >&2; echo "$out" >&2; exit 1; }
    echo "self-test: broken $file ($needle) refused: $(grep -m1 INVALID <<<"$out")"
    rm -rf "$copy"
  done
  echo "self-test: every broken copy was refused"
fi
