#!/usr/bin/env bash
# System packages the project needs beyond Python wheels, installed when missing and when we may (root).
# bubblewrap: the code sandbox's namespaces (rewards/sandbox.py). Without root this prints what is missing
# and carries on: the sandbox then refuses to run unless the config accepts the weaker mode.
set -u
need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null 2>&1 \
    || echo "system-deps: could not install ${need[*]} (the code sandbox will refuse to run)" >&2
else
  echo "system-deps: missing ${need[*]}; install them as root (apt-get install ${need[*]})" >&2
fi
exit 0
