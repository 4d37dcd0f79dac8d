"""One gated registration in its own process (the concurrency test starts two at once).

    python -m tests.gate_worker ENCODER_DIR NAME FLIPPED_GROUPS BARRIER_DIR
"""

import json
import sys
import time
from pathlib import Path

import mlflow

from tests.builders import answers_for, submit_logged


def main() -> None:
    encoder, name, flipped, barrier = sys.argv[1:5]
    from tests.builders import lookup_classifier

    groups = tuple(int(g) for g in flipped.split(",") if g)
    model, tokenizer = lookup_classifier(Path(encoder), answers_for(groups))
    with mlflow.start_run(run_name=f"worker-{flipped or 'none'}"):
        logged = submit_logged(model, tokenizer, answers_for(groups))
        # Both workers judge the same champion at the same moment: the race the gate must survive.
        Path(barrier, flipped or "none").touch()
        deadline = time.time() + 120
        while len(list(Path(barrier).iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.05)
        from src.mlflow_io.gate import register_gated

        decision = register_gated(logged, name, 0.05)
    print(json.dumps(decision))


if __name__ == "__main__":
    main()
