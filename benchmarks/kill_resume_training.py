"""Fault tolerance of ``mim fit``: SIGKILL a run mid-epoch, resume from its last checkpoint, compare curves.

The tiny stage-2 config trains for ``--steps`` with a checkpoint every
``--every`` steps. One run goes through uninterrupted; another is killed
with SIGKILL once a checkpoint past ``--kill-after`` exists, then resumed
with ``--ckpt_path``. Reported: the step the resumed run started from, and
the largest difference between the two loss curves at the steps logged
after the resume (0 means the curve continues exactly: the data loader's
position and the random state are in the checkpoint).

    python benchmarks/kill_resume_training.py
"""

from __future__ import annotations

import argparse
import csv
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIM = str(Path(sys.executable).parent / "mim")
CONFIG = str(REPO / "configs" / "textbind" / "tiny_stage2_instruction.yaml")


def command(root: Path, steps: int, every: int, lora: bool = False) -> list[str]:
    lora_args = ["--model.lora", "{r: 8, alpha: 16, dropout: 0.1}"] if lora else []
    return [MIM, "fit", "--config", CONFIG, "--model.init_from", "null", f"--trainer.max_steps={steps}", *lora_args,
            "--data.init_args.train",
            "[{path: synth/samples/conversations.jsonl, weight: 2.0, image_root: '${package_dir:skimage}/data'}]",
            f"--trainer.default_root_dir={root}", "--trainer.log_every_n_steps=1",
            f"--trainer.logger={{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {root}}}}}",
            f"--trainer.callbacks=[{{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: "
            f"{{dirpath: {root}/checkpoints, every_n_train_steps: {every}, save_top_k: -1, save_last: true}}}}]"]


def losses(root: Path) -> dict[int, float]:
    curve = {}
    for path in sorted(root.glob("lightning_logs/version_*/metrics.csv")):
        with open(path) as handle:
            for row in csv.DictReader(handle):
                if row.get("train/loss"):
                    curve[int(row["step"])] = float(row["train/loss"])
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--kill-after", type=int, default=15)
    parser.add_argument("--lora", action="store_true", help="stage 2 with LoRA adapters (dropout 0.1)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp())
    clean, killed = base / "clean", base / "killed"
    subprocess.run(command(clean, args.steps, args.every, args.lora), check=True, capture_output=True, cwd=REPO)
    process = subprocess.Popen(command(killed, args.steps, args.every, args.lora), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, cwd=REPO)
    while process.poll() is None and not list((killed / "checkpoints").glob(f"*step={args.kill_after}.ckpt")):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    checkpoints = sorted((killed / "checkpoints").glob("*step=*.ckpt"),
                         key=lambda p: int(p.stem.split("step=")[1].split("-")[0]))
    resume_from = checkpoints[-1]
    resumed_step = int(resume_from.stem.split("step=")[1].split("-")[0])
    subprocess.run(command(killed, args.steps, args.every, args.lora) + ["--ckpt_path", str(resume_from)], check=True,
                   capture_output=True, cwd=REPO)
    reference, resumed = losses(clean), losses(killed)
    after = [step for step in sorted(reference) if step >= resumed_step and step in resumed]
    difference = max(abs(reference[s] - resumed[s]) for s in after) if after else float("nan")
    print(f"killed after the step-{resumed_step} checkpoint (of {args.steps}); resumed from {resume_from.name}")
    print(f"steps compared after the resume: {len(after)}; largest |loss difference| vs the uninterrupted run: "
          f"{difference:.2e}; final loss {reference[max(reference)]:.4f} vs {resumed[max(resumed)]:.4f}")


if __name__ == "__main__":
    main()
