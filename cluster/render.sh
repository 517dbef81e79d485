#!/usr/bin/env bash
# Print a file from cluster/ with its ${EMOTIONS_*} placeholders filled from cluster/storage.env
# (values already in the environment win). Only the names defined in storage.env are replaced, so
# `{date}` and any other `$` in a manifest pass through untouched. Fails if a name is left empty.
#
#     cluster/render.sh cluster/kuberay/raycluster.yaml | kubectl apply -f -
#     cluster/render.sh cluster/launcher/aws-gpu.yaml > /tmp/emotions-aws.yaml && ray up /tmp/emotions-aws.yaml
set -euo pipefail

if [ $# -ne 1 ] || [ ! -f "$1" ]; then
    echo "usage: $0 FILE   (a manifest under cluster/, printed with its placeholders filled)" >&2
    exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
names=$(grep -oE '^EMOTIONS_[A-Z_]+' "$here/storage.env")

set -a
# shellcheck source=storage.env
. "$here/storage.env"
set +a

for name in $names; do
    if [ -z "${!name}" ]; then
        echo "$0: $name is empty; set it in cluster/storage.env or the environment" >&2
        exit 2
    fi
done
exec envsubst "$(printf '${%s} ' $names)" < "$1"
