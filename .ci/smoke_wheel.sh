#!/usr/bin/env bash
# vitmha as a user who installed the wheel has it: built from this checkout, installed in place of the editable
# install, run from a folder outside the clone. Every subcommand's --help, then a tiny real run on built-in
# data: fit -> test -> predict -> export (ONNX, checked against PyTorch) -> explain -> evaluate -> tune (2 trials).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VITMHA_SMOKE_VENV:-$PWD/.venv}"   # CI: the venv the tests ran in, last
PY="$VENV/bin/python"
VITMHA="$VENV/bin/vitmha"
WHEELS=$(mktemp -d)
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" .
"$PY" -m pip install -q --force-reinstall --no-deps "$WHEELS"/vitmha-*.whl
"$PY" -m pip install -q "$(ls "$WHEELS"/vitmha-*.whl)[export]"   # its dependencies, from its own metadata

CLONE=$PWD
WORK=$(mktemp -d)
cd "$WORK"
where=$("$PY" -c "import vitmha, os; print(os.path.dirname(os.path.realpath(vitmha.__file__)))")
# The venv may live inside the clone (CI's .venv); what must not happen is importing the clone's source folder.
if [ "$where" = "$CLONE/vitmha" ] || [ "${where##*/site-packages/}" = "$where" ]; then
  echo "vitmha imports from $where, not from the installed wheel" >&2; exit 1
fi
echo "vitmha from $where"

"$VITMHA" --help > /dev/null
for cmd in $("$PY" -c "from vitmha.cli import COMMANDS; print(' '.join(COMMANDS))"); do
  "$VITMHA" "$cmd" --help > /dev/null || { echo "vitmha $cmd --help failed" >&2; exit 1; }
done
echo "every subcommand's --help runs"

cat > tiny.yaml <<'EOF'
seed_everything: 0
trainer: {accelerator: cpu, max_epochs: 1, limit_train_batches: 3, limit_val_batches: 2, limit_test_batches: 2,
          default_root_dir: runs, enable_progress_bar: false}
model:
  class_path: vitmha.tasks.ImageClassifier
  init_args: {backbone_kwargs: {img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}, warmup_epochs: 0}
data:
  class_path: vitmha.data.DigitsDataModule
  init_args: {image_size: 16, batch_size: 32}
EOF
cat > space.yaml <<'EOF'
directions: [val/acc:maximize]
space:
  model.init_args.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
EOF
"$PY" - <<'EOF'
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

d = load_digits()
for i in range(3):
    Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((16, 16)).save(f"digit{i}.png")
EOF
"$VITMHA" fit --config tiny.yaml
LAST=runs/lightning_logs/version_0/checkpoints/last.ckpt
"$VITMHA" test --config tiny.yaml --ckpt_path "$LAST"
"$VITMHA" predict --checkpoint "$LAST" --input digit0.png digit1.png digit2.png --output preds --no-progress
test "$(wc -l < preds/predictions.csv)" -eq 4
"$VITMHA" export --checkpoint "$LAST" --format onnx --output model.onnx
test -s model.onnx && test -s model.preprocess.json
"$VITMHA" explain --checkpoint "$LAST" --input digit0.png --output explain.png --method attention,rollout
test -s explain.png
"$VITMHA" evaluate --checkpoint "$LAST" --config tiny.yaml --split val --output report
test -s report/summary.json
"$VITMHA" tune --config tiny.yaml --search space.yaml --n_trials 2 --output study
test -s study/best.yaml
echo "wheel smoke run: fit, test, predict, export, explain, evaluate, tune all ran outside the clone"
