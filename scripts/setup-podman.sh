#!/usr/bin/env bash
# Install what the container images and tests/test_containers.py need, as root on Debian/Ubuntu:
# podman (its Docker API serves KFP's DockerRunner), runc, debootstrap (the local bookworm base), and
# /etc/containers/containers.conf with `default_ulimits = []` when none exists: in sandboxes that refuse to
# raise RLIMIT_NOFILE/NPROC, podman's default ulimits make every container fail; an empty list keeps the
# host's limits. crun refuses hybrid cgroups on such hosts, so every command here uses `podman --runtime runc`.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  echo "setup-podman: needs root (apt-get, /etc/containers)" >&2; exit 1
fi
missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
fi
if [ ! -f /etc/containers/containers.conf ]; then
  mkdir -p /etc/containers
  printf '[containers]\ndefault_ulimits = []\n' >/etc/containers/containers.conf
fi
podman --runtime runc info --format '{{.Version.Version}}' >/dev/null
echo "podman $(podman --version | cut -d' ' -f3) with runc: ready"
