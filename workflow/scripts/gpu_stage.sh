#!/usr/bin/env bash
# Bring a file larger than one device call may carry (64 MiB with the wheels; the SmolLM2 GGUF is
# 98 MB) to the GPU machine in parts, one part per call, while the machine stays warm:
#
#   workflow/scripts/gpu_stage.sh split models/SmolLM2-135M-Instruct.Q4_1.gguf   # here
#     -> .stage/<name>.part-K-of-N (PART_MIB MiB each, default 30) and .stage/<name>.sha256
#   workflow/scripts/gpu_stage.sh collect models                                  # there, every call
#
# Call k carries .stage/<name>.part-k-of-N and .stage/<name>.sha256 and starts with `collect`: it
# keeps the parts it finds in $STAGE (default /tmp/stage, which lives as long as the machine) and,
# once all N are there, writes <dest>/<name> and checks it against the SHA-256 taken at the split;
# a mismatch leaves no file behind and exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/../.."
stage=${STAGE:-/tmp/stage}
usage="usage: $0 split FILE | collect DEST_DIR"
case "${1:-}" in
  split)
    file=${2:?$usage}
    [ -f "$file" ] || { echo "split: $file is not a file"; exit 2; }
    name=$(basename "$file")
    mkdir -p .stage
    rm -f .stage/"$name".part-* .stage/"$name".sha256
    split -b "${PART_MIB:-30}M" -d -a 3 "$file" .stage/"$name".tmp-
    parts=(.stage/"$name".tmp-*)
    n=${#parts[@]}
    for k in $(seq 1 "$n"); do mv "${parts[$((k - 1))]}" ".stage/$name.part-$k-of-$n"; done
    sha256sum "$file" | cut -d' ' -f1 > .stage/"$name".sha256
    ls -l .stage/"$name".*
    ;;
  collect)
    dest=${2:?$usage}
    mkdir -p "$stage" "$dest"
    for f in .stage/*.part-*-of-* .stage/*.sha256; do [ -e "$f" ] && cp "$f" "$stage/"; done
    status=0
    # The checksum travels with every part: it names the files being staged, whichever part came.
    for sum in "$stage"/*.sha256; do
      [ -e "$sum" ] || { echo "collect: no parts in $stage"; break; }
      name=$(basename "$sum" .sha256)
      some=$(ls "$stage/$name".part-*-of-* 2>/dev/null | head -1)
      [ -n "$some" ] || { echo "collect: $name: no parts"; continue; }
      n=${some##*-of-}
      have=0
      for k in $(seq 1 "$n"); do [ -e "$stage/$name.part-$k-of-$n" ] && have=$((have + 1)); done
      if [ "$have" != "$n" ]; then echo "collect: $name: $have of $n parts"; continue; fi
      want=$(cat "$sum")
      [ -e "$dest/$name" ] && [ "$(sha256sum "$dest/$name" | cut -d' ' -f1)" = "$want" ] \
        && { echo "collect: $dest/$name is complete"; continue; }
      for k in $(seq 1 "$n"); do cat "$stage/$name.part-$k-of-$n"; done > "$dest/$name.tmp"
      got=$(sha256sum "$dest/$name.tmp" | cut -d' ' -f1)
      if [ "$got" != "$want" ]; then
        rm -f "$dest/$name.tmp"
        echo "collect: $name: SHA-256 of the joined parts is $got, not that of the split file"
        status=1
        continue
      fi
      mv "$dest/$name.tmp" "$dest/$name"
      echo "collect: $dest/$name assembled from $n parts, SHA-256 $got"
    done
    exit $status
    ;;
  *) echo "$usage"; exit 2 ;;
esac
