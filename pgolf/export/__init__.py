"""From runs to a submission folder the challenge accepts (docs/records/record-stack.md §0, §4.7).

record.py      the record pipeline: what an exported `train_gpt.py` runs (train, calibrate, quantise,
               score the artifact alone with TTT), as ordinary pgolf code
submission.py  `pgolf export RUN...`: the folder (script, submission.json, README, logs, artifacts)
check.py       `pgolf check DIR`: the pre-submission checks
The script itself is written, and its code bytes counted, by pgolf.script.
"""
