#!/usr/bin/env bash
# Print a file from cluster/ with its ${EMOTIONS_*} placeholders filled from cluster/storage.env
# (values already in the environment win). Only the names defined in storage.env are replaced, so
# `{date}` and any other `$` in a manifest pass through untouched. Fails, naming the variable, if
# a name the file uses is empty (the AWS names have no default: set them for the launcher file)
# or an AMI id / instance-profile ARN does not look like one.
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
    grep -qF "\${$name}" "$1" || continue  # not used by this file
    value=${!name}
    if [ -z "$value" ]; then
        echo "$0: $name is empty, and $1 uses it; set it in your environment or cluster/storage.env" \
             "(see the comment above it there)" >&2
        exit 2
    fi
    case $name in
        EMOTIONS_AWS_AMI) pattern='^ami-[0-9a-f]{8,17}$' ;;
        EMOTIONS_AWS_*_PROFILE_ARN) pattern='^arn:aws[a-z-]*:iam::[0-9]{12}:instance-profile/.+$' ;;
        *) pattern='.' ;;
    esac
    if ! [[ $value =~ $pattern ]]; then
        echo "$0: $name=$value does not look like ${pattern}; see the comment above it in cluster/storage.env" >&2
        exit 2
    fi
done
exec envsubst "$(printf '${%s} ' $names)" < "$1"
