#!/usr/bin/env bash
# Submit a clpipe run to a Ray cluster as a Ray job.
#
#   cluster/submit.sh CONFIG [STORAGE]
#
#   CONFIG   run YAML inside this repository (it is uploaded with the code), e.g. configs/tiny.yaml,
#            or an absolute path that exists on the cluster's head node.
#   STORAGE  absolute path on the cluster where the run folder goes (default /mnt/clpipe/runs).
#            On several nodes it must be a shared file system mounted at the same path everywhere.
#
# Environment: RAY_ADDRESS (default http://127.0.0.1:8265, the dashboard of a local head or of a
# `ray dashboard ray_cluster.yaml` tunnel); extra arguments for `ray job submit` in
# SUBMIT_ARGS, e.g. SUBMIT_ARGS="--no-wait".
set -euo pipefail

usage() { echo "usage: $0 CONFIG [STORAGE]   (STORAGE default: /mnt/clpipe/runs)" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage

config="$1"
storage="${2:-/mnt/clpipe/runs}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"

# The job runs in a copy of this repository inside Ray's session folder on the head node, so
# a relative path there means "relative to the repository root". A local config inside the
# repository becomes exactly that; any other path is passed on as an absolute path, which must
# exist on the head node (true when you submit from the head, or for files on the shared storage).
if [[ -f "$config" ]]; then
    abs="$(cd "$(dirname "$config")" && pwd -P)/$(basename "$config")"
    case "$abs" in
        "$root"/*) config="${abs#"$root"/}" ;;
        *) config="$abs"
           echo "note: $config is outside $root, so it is not uploaded: it must exist at this path" \
                "on the head node (e.g. on the shared storage)" >&2 ;;
    esac
elif [[ "$config" != /* ]]; then
    echo "$0: $config: no such file" >&2; exit 2
else
    echo "note: $config is not on this machine; it must exist on the cluster's head node" >&2
fi

# clpipe's --storage is a file system path; a relative one would land in Ray's session folder.
case "$storage" in
    *://*) echo "$0: STORAGE must be a file system path (a shared mount such as /mnt/clpipe/runs), not a URI: $storage" >&2; exit 2 ;;
    /*) ;;
    *) echo "$0: STORAGE must be an absolute path on the cluster: $storage" >&2; exit 2 ;;
esac

# Ray clusters started with token auth reject job submissions without it.
if [[ -f "$HOME/.ray/auth_token" ]]; then
    export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
fi

address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
auth="${RAY_AUTH_MODE:+RAY_AUTH_MODE=$RAY_AUTH_MODE }"   # the `ray job` commands below need it too
cd "$root"

cat <<EOF
Submitting to $address: clpipe run $config --storage $storage
  follow the logs:   ${auth}ray job logs -f <submission id> --address $address   (id printed below)
  list / stop jobs:  ${auth}ray job list --address $address ; ${auth}ray job stop <submission id> --address $address
  stage states:      clpipe status <run id> --storage $storage   (on a node that mounts $storage)
  after preemption or a crash, submit the same command again:
      $0 $1 $storage
    the ledger under $storage/<run id> goes on from the first stage not done, and a train stage
    cut off mid-way resumes from its last Ray Train checkpoint. Keep the config unchanged: the
    run id is the config's name plus a hash of its contents.
EOF

# SUBMIT_ARGS is split on spaces on purpose (several flags).
# shellcheck disable=SC2086
exec ray job submit --address "$address" \
    --runtime-env cluster/runtime_env.yaml --working-dir . ${SUBMIT_ARGS:-} \
    -- clpipe run "$config" --storage "$storage"
