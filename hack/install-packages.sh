#!/usr/bin/env bash
# Installs the Debian packages of the commands the local stack needs that this machine lacks (the list, with who
# needs each: hack/debian-packages.txt). With arguments, only those commands (as the list names them), e.g.
#   bash hack/install-packages.sh unshare setpriv /usr/bin/prometheus
# As root with apt-get it installs them; otherwise it fails naming each missing command and its package. A no-op
# when nothing is missing. Used by hack/test.sh (make test), hack/demo.sh (make demo) and .ci/run.
set -euo pipefail
list="$(dirname "$0")/debian-packages.txt"
declare -A package_of=()
order=()
while read -r command package _; do
  [[ -z "$command" || "$command" == \#* ]] && continue
  package_of[$command]=$package
  order+=("$command")
done < "$list"
wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=("${order[@]}")
missing=() packages=()
for command in "${wanted[@]}"; do
  package=${package_of[$command]:-}
  [ -n "$package" ] || { echo "install-packages.sh: $command is not in $list" >&2; exit 2; }
  command -v "$command" >/dev/null 2>&1 && continue
  missing+=("$command ($package)")
  [[ " ${packages[*]} " == *" $package "* ]] || packages+=("$package")
done
[ ${#packages[@]} -gt 0 ] || exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-packages.sh: missing ${missing[*]}: apt-get install -y ${packages[*]} (as root)" >&2
  exit 1
fi
echo "install-packages.sh: installing Debian packages ${packages[*]} (for ${missing[*]})" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
for command in "${wanted[@]}"; do
  command -v "$command" >/dev/null 2>&1 || { echo "install-packages.sh: $command still missing after installing ${package_of[$command]}" >&2; exit 1; }
done
