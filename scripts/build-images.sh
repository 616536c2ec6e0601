#!/usr/bin/env bash
# Build images/Dockerfile (cpu) and images/Dockerfile.cuda (cuda) with podman on a machine that cannot pull
# public base images: both are built FROM a local Debian bookworm base with Python 3.11 (bookworm's python3),
# made here with debootstrap from the Debian mirror apt uses. Same Dockerfiles, another BASE_IMAGE.
#
#   scripts/build-images.sh            # both images
#   scripts/build-images.sh cpu        # only the CPU image (what the containerised pipeline runs)
#
# Needs (Debian): apt-get install podman runc debootstrap, and /etc/containers/containers.conf with
# `[containers]` / `default_ulimits = []` where the sandbox refuses to raise RLIMIT_NOFILE (README, "Containers").
# Where pip is configured with local indexes (`pip config list`: file:// extra-index-url, e.g. torch and
# its CUDA libraries), they are mounted read-only into the build instead of downloading several GB; the
# Dockerfiles themselves only run plain pip, so they build the same way anywhere else.
#
# Environment: FLEXI_JEST_IMAGE (default localhost/flexi-jest:0.1.0), FLEXI_JEST_CUDA_IMAGE
# (localhost/flexi-jest-cuda:0.1.0), FLEXI_JEST_BASE_IMAGE (localhost/debian-python:3.11-bookworm; made if
# missing). Layers are cached: a rebuild after a source change reinstalls the project, not torch.
set -euo pipefail
cd "$(dirname "$0")/.."
podman=(podman --runtime runc)
base=${FLEXI_JEST_BASE_IMAGE:-localhost/debian-python:3.11-bookworm}
cpu_image=${FLEXI_JEST_IMAGE:-localhost/flexi-jest:0.1.0}
cuda_image=${FLEXI_JEST_CUDA_IMAGE:-localhost/flexi-jest-cuda:0.1.0}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(cpu cuda)
for target in "${targets[@]}"; do
  case "$target" in cpu|cuda) ;; *) echo "unknown image '$target' (expected cpu and/or cuda)" >&2; exit 2 ;; esac
done
for tool in podman runc; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get install podman runc debootstrap" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

make_base() {
  # debootstrap minbase of bookworm (its python3 is 3.11) with python3-venv/pip, imported as one layer.
  command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }
  local mirror
  mirror=$(apt-get indextargets --format '$(REPO_URI)' 'Codename: bookworm' 'Identifier: Packages' 2>/dev/null \
           | head -n1)
  mirror=${mirror:-http://deb.debian.org/debian/}
  echo "== base $base: debootstrap --variant=minbase bookworm from $mirror"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; exit 1; }
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
  tar -C "$work/rootfs" -c . | "${podman[@]}" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$base" >/dev/null
  rm -rf "$work/rootfs"
  "${podman[@]}" run --rm "$base" python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version'
}

# pip's local indexes (file:// URLs in this machine's pip configuration), mounted read-only at the same paths,
# with a pip.conf naming them; none (plain pip) where pip has no local index.
build_opts=()
torch_index=()
pip_setting() {  # the file:// entries of one pip setting (global.extra-index-url, global.find-links) that exist here
  { python3 -m pip config list 2>/dev/null || true; } | sed -n "s/^global\.$1='\(.*\)'$/\1/p" | tr ' ' '\n' \
    | sed -n 's|^file://||; \|^/|p' | while read -r path; do if [ -d "$path" ]; then echo "$path"; fi; done | sort -u
}
indexes=$(pip_setting extra-index-url)
links=$(pip_setting find-links)
if [ -n "$indexes$links" ]; then
  {
    # The local indexes first (pip takes the first of equal candidates: no download of what lies here), then
    # the index pip is configured with for the rest.
    echo "[global]"
    remote=$({ python3 -m pip config list 2>/dev/null || true; } | sed -n "s/^global\.index-url='\(.*\)'$/\1/p")
    first=
    for path in $indexes; do
      if [ -d "$path/torch" ]; then first=$path; fi
    done
    first=${first:-$(echo $indexes | cut -d' ' -f1)}
    if [ -n "$first" ]; then
      echo "index-url = file://$first"
      echo "extra-index-url = $(for path in $indexes; do [ "$path" = "$first" ] || printf 'file://%s ' "$path"; done)${remote:-https://pypi.org/simple}"
      torch_index=(--build-arg "TORCH_INDEX_URL=file://$first")
    fi
    [ -z "$links" ] || echo "find-links =" $links
    # The CA bundle pip is configured with on this machine (it may hold a proxy's CA), mounted beside.
    cert=$(python3 -m pip config list 2>/dev/null | sed -n "s/^global\.cert='\(.*\)'$/\1/p" | head -n1)
    if [ -n "$cert" ] && [ -f "$cert" ]; then
      echo "cert = /etc/pip-build-ca.crt"
      build_opts+=(--volume "$cert:/etc/pip-build-ca.crt:ro")
    fi
  } >"$work/pip.conf"
  # an index's pages may link to files beside it (../../files/...): its parent folder goes in with it
  for path in $(for path in $indexes; do dirname "$path"; done; echo $links); do
    build_opts+=(--volume "$path:$path:ro")
  done
  build_opts+=(--volume "$work/pip.conf:/etc/pip.conf:ro")
  echo "== pip's local indexes and links mounted read-only into the build, with this pip.conf:"
  sed 's/^/   /' "$work/pip.conf"
fi

# Each image holds torch 2.14.1 with triton and its CUDA libraries (5.3 GB installed: PyPI's wheel, the one the
# local indexes hold) and podman keeps a layer twice while committing it: check the space before starting.
need_gb=${FLEXI_JEST_BUILD_GB:-15}
storage=$("${podman[@]}" info --format '{{.Store.GraphRoot}}')
free_gb=$(( $(df --output=avail -k "$storage" | tail -n1) / 1048576 ))
for target in "${targets[@]}"; do
  image=$cpu_image; [ "$target" = cpu ] || image=$cuda_image
  if ! "${podman[@]}" image exists "$image" && [ "$free_gb" -lt "$need_gb" ]; then
    echo "not enough disk to build $image: $storage has ${free_gb} GB free, a build needs about ${need_gb} GB" \
         "(torch and its CUDA libraries, held twice while podman commits the layer; FLEXI_JEST_BUILD_GB overrides)" >&2
    exit 3
  fi
done

"${podman[@]}" image exists "$base" || make_base

for target in "${targets[@]}"; do
  start=$(date +%s)
  image=$cpu_image; [ "$target" = cpu ] || image=$cuda_image
  previous=$("${podman[@]}" image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
  if [ "$target" = cpu ]; then
    echo "== $cpu_image from images/Dockerfile (BASE_IMAGE=$base)"
    "${podman[@]}" build --layers --file images/Dockerfile --tag "$cpu_image" \
      --build-arg "BASE_IMAGE=$base" "${torch_index[@]}" "${build_opts[@]}" .
  else
    echo "== $cuda_image from images/Dockerfile.cuda (BASE_IMAGE=BUILDER_IMAGE=$base: no pytorch/pytorch here)"
    "${podman[@]}" build --layers --file images/Dockerfile.cuda --tag "$cuda_image" \
      --build-arg "BASE_IMAGE=$base" --build-arg "BUILDER_IMAGE=$base" "${build_opts[@]}" .
  fi
  "${podman[@]}" run --rm "$image" flexi-jest --version
  # the image this build replaced (a source change): its own layers go, the cached torch layer stays
  if [ -n "$previous" ] && [ "$previous" != "$("${podman[@]}" image inspect --format '{{.Id}}' "$image")" ]; then
    "${podman[@]}" rmi "$previous" >/dev/null 2>&1 || true
  fi
  size=$("${podman[@]}" image inspect --format '{{.Size}}' "$image")
  echo "== built $image in $(( $(date +%s) - start )) s, $(( size / 1000000 )) MB"
done
