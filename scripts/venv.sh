# Sourced by the setup scripts: `make_venv DIR [venv flags]` creates DIR (idempotent), sets the array `pip` to its
# pip, and installs ${REGATE_TORCH:-torch==2.13.0} (the CPU wheel) when the venv has no torch yet.
make_venv() {
  local venv="$1"
  shift
  [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$@" "$venv"
  pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
  if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "setup: installing ${REGATE_TORCH:-torch==2.13.0} into $venv"
    "${pip[@]}" install "${REGATE_TORCH:-torch==2.13.0}"
  fi
}
