#!/usr/bin/env bash
# Prepares .whl/ (git-ignored) for running the CUDA checks on a GPU machine that has Python 3.12 and PyTorch
# but no network (as measured in BENCHMARKS.md, "GPU"): the wheels this project needs beyond such an image,
# the editable mapping of the checkout, and .whl/setup.sh, which the GPU machine sources from the repo root:
#   source .whl/setup.sh && export PYTHONPATH=/tmp/site
#   python3 -m pytest tests/test_training_e2e.py \
#     --deselect tests/test_training_e2e.py::test_refurbishment_trains_on_predictions_and_never_touches_final_labels
# ITK and SimpleITK (about 160 MB of wheels) are replaced by import-only shims: monailabel imports them at
# start-up, and only inference output (hence refurbishment) and DICOM SEG writes use them.
set -euo pipefail
cd "$(dirname "$0")/.."
W=.whl
mkdir -p "$W/site"
pins() { for p in "$@"; do grep -iE "^${p//-/[-_]}==" requirements.lock || { echo "no pin for $p" >&2; exit 1; }; done; }
PKGS=$(pins annotated-types bcrypt cachetools dicomweb-client expiring-dict expiringdict fastapi girder-client \
  google-auth jsonschema monai monailabel nibabel passlib pydantic pydantic-core pydantic-settings pydicom pydicom-seg \
  pyjwt pynrrd pynetdicom python-dotenv python-multipart pytorch-ignite requests-toolbelt retrying schedule shapely \
  starlette typing-inspection uvicorn watchdog pytest-timeout pyasn1 pyasn1-modules numpymaxflow pyrsistent \
  importlib-resources opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions importlib-metadata \
  diskcache cryptography cffi pycparser)
for p in $PKGS; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_34_x86_64 -d "$W" "$p"
done
python3 -m pip wheel -q --no-deps -w "$W" "$(grep -i '^timeloop==' requirements.lock)"  # source-only on PyPI
for m in itk SimpleITK; do
  mkdir -p "$W/site/$m"
  printf '%s\n' "# import-only shim for the GPU checks (see scripts/gpu_wheelhouse.sh)" \
    "def __getattr__(name):" "    if name.startswith('__'):" "        raise AttributeError(name)" \
    "    return type(name, (), {})" > "$W/site/$m/__init__.py"
done
# the package's editable layout (labelsentinel.models -> models/, ...), resolved against the checkout there
python3 - "$W/site/labelsentinel_finder.py" <<'PY'
import sys
open(sys.argv[1], "w").write('''import importlib.abc, importlib.util, os, sys
ROOT = os.environ.get("LABELSENTINEL_ROOT", os.getcwd())
MAP = {"labelsentinel.models": "models", "labelsentinel.strategies": "strategies"}
class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in MAP:
            d = os.path.join(ROOT, MAP[name])
            return importlib.util.spec_from_file_location(name, os.path.join(d, "__init__.py"),
                                                          submodule_search_locations=[d])
        return None
sys.meta_path.insert(0, Finder())
''')
PY
echo "import labelsentinel_finder" > "$W/site/sitecustomize.py"
cat > "$W/setup.sh" <<'SH'
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $(ls .whl/*.whl | grep -v monailabel) >/dev/null || return 1
# monailabel's wheel also holds a top-level `tests` package and data files that replace its package dir under --target
python3 -c "import zipfile,glob; z=zipfile.ZipFile(glob.glob('.whl/monailabel-*.whl')[0]); z.extractall('/tmp/site', [n for n in z.namelist() if n.startswith('monailabel/')])" || return 1
cp -r .whl/site/. /tmp/site/
export LABELSENTINEL_ROOT=$PWD
SH
du -sh "$W"
