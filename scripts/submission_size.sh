#!/usr/bin/env bash
# What a stop would submit, measured before it is: the commits since BASE packed as git sends them
# (a thin pack) and their diffs as text (binary files as git's binary patches, a deleted file's
# content included), against the workplace's limits (512 MiB packed, 256 MiB of diffs; over
# either, the whole submission is refused). Session 25's submission was refused for size, and the
# results of its GPU session went with it: run this before stopping whenever the change holds
# more than code (GPU results, resume state, figures).
#
#   bash scripts/submission_size.sh [BASE]   # BASE: the commit the session started from (default:
#                                            # the newest commit older than 4 hours, as the stop hook)
#
# Exits 1 when either size passes MARGIN (default 0.5) of its limit, and names the largest files
# the change adds: keep those out of git (or smaller) rather than risk the whole submission.
set -euo pipefail
base=${1:-$(git rev-list -1 --before='4 hours ago' HEAD)}
[ -n "$base" ] || base=$(git rev-list --max-parents=0 HEAD | tail -n 1)
PACK_LIMIT_MIB=${PACK_LIMIT_MIB:-512}
DIFF_LIMIT_MIB=${DIFF_LIMIT_MIB:-256}
MARGIN=${MARGIN:-0.5}
packed=$(printf 'HEAD\n^%s\n' "$base" | git pack-objects --revs --thin --stdout -q | wc -c)
diffs=$(git log -p --binary --format= "$base..HEAD" | wc -c)
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
over() { awk -v b="$1" -v l="$2" -v m="$MARGIN" 'BEGIN { exit !(b > m * l * 1048576) }'; }
echo "submission since $(git rev-parse --short "$base"): $(git rev-list --count "$base..HEAD") commits," \
  "packed $(mib "$packed") of $PACK_LIMIT_MIB MiB, diffs $(mib "$diffs") of $DIFF_LIMIT_MIB MiB"
echo "largest files it adds:"
git rev-list --objects "$base..HEAD" | git cat-file --batch-check='%(objecttype) %(objectsize) %(rest)' \
  | awk '$1 == "blob" && $3 != "" { print $2, $3 }' | sort -rn | head -n 5 \
  | while read -r size path; do echo "  $(mib "$size")  $path"; done
if over "$packed" "$PACK_LIMIT_MIB" || over "$diffs" "$DIFF_LIMIT_MIB"; then
  echo "submission_size: over $MARGIN of a limit; a stop may be refused for size (and all of it lost)" >&2
  exit 1
fi
