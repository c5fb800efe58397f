"""Fault injection for checkpoint saves: SIGKILL a training run at every file-system operation of one save.

Run as ``python checkpoint_faults.py WORK_DIR FLAGS_JSON SAVE_STEP``. The script imports the trainer once, then forks
one training child per kill point (so each run costs only its training, not the imports). While the save at
``SAVE_STEP`` runs, a ``sys.addaudithook`` hook counts the file-system operations Python performs (opening a file
for writing, ``os.mkdir``, ``os.rename``/``os.replace``, ``os.remove``, ``os.rmdir``, ``shutil.rmtree``) and kills
its own process with SIGKILL just before the k-th one; the last point kills it right after the save returned.
Every killed run is then resumed with ``--resume_from_checkpoint latest`` in a fresh child, and an uninterrupted
run is trained for reference. Prints a JSON report: the number of operations of the save and, per kill point,
how the killed and the resumed child ended.
"""

import json
import os
import signal
import sys
from pathlib import Path

from diffit_diffusers.training import trainer as trainer_module
from diffit_diffusers.training.cli import main_image


WRITE_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree"}


def is_write(event: str, args: tuple) -> bool:
    if event in WRITE_EVENTS:
        return True
    if event == "open":
        mode, flags = args[1], args[2]
        if isinstance(mode, str):
            return any(letter in mode for letter in "wax+")
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    return False


def train_with_fault(flags: list[str], save_step: int, kill_at: int | None, count_file: Path | None) -> None:
    """Child process body: train, SIGKILLing itself before the ``kill_at``-th write of the save at ``save_step``
    (or after the save when ``kill_at`` is one past the count); without ``kill_at``, record the count."""
    counter = {"active": False, "writes": 0}

    def hook(event: str, args: tuple) -> None:
        if counter["active"] and is_write(event, args):
            counter["writes"] += 1
            if counter["writes"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    original_save = trainer_module.Trainer.save_checkpoint

    def save_checkpoint(self):
        counter["active"] = self.global_step == save_step
        try:
            return original_save(self)
        finally:
            if counter["active"]:
                counter["active"] = False
                if count_file is not None:
                    count_file.write_text(str(counter["writes"]))
                if kill_at == counter["writes"] + 1:
                    os.kill(os.getpid(), signal.SIGKILL)

    trainer_module.Trainer.save_checkpoint = save_checkpoint
    os._exit(main_image(flags))


def run_child(body, *args) -> dict:
    """Fork, run ``body(*args)`` in the child; how it ended."""
    pid = os.fork()
    if pid == 0:
        try:
            body(*args)
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    return {"exit_code": os.WEXITSTATUS(status)}


def main() -> None:
    work_dir, flags, save_step = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    count_file = work_dir / "writes.txt"
    report = {"reference": run_child(train_with_fault, [*flags, "--output_dir", str(work_dir / "reference")], save_step, None, count_file)}
    writes = int(count_file.read_text())
    report["writes_per_save"] = writes
    report["points"] = []
    for kill_at in range(1, writes + 2):
        output = str(work_dir / f"killed-{kill_at}")
        killed = run_child(train_with_fault, [*flags, "--output_dir", output], save_step, kill_at, None)
        listing = sorted(path.name for path in Path(output).iterdir())
        resumed = run_child(
            train_with_fault, [*flags, "--output_dir", output, "--resume_from_checkpoint", "latest"], save_step, None, None
        )
        report["points"].append({"kill_at": kill_at, "killed": killed, "left": listing, "resumed": resumed, "output": output})
    print(json.dumps(report))


if __name__ == "__main__":
    main()
