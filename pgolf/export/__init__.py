"""From runs to a submission folder the challenge accepts (docs/records/record-stack.md §0, §4.7).

record.py      the record pipeline: what an exported `train_gpt.py` runs (train, calibrate, quantise,
               score the artifact alone with TTT), as ordinary pgolf code
bundle.py      record.py's module closure for one configuration, flattened into one readable script
closure.py     reading the modules the record pipeline reaches (bindings, imports, registry trims)
scopes.py      the name resolution the flattening needs
specialise.py  the flattened code specialised to the baked configuration (facts.py, walker.py: what is
               known of each name; fold.py: constant folding and dead code)
codebytes.py   code bytes the records' way, on the exported script (`code_bytes(cfg)`)
submission.py  `pgolf export RUN...`: the folder (script, submission.json, README, logs, artifacts)
check.py       `pgolf check DIR`: the pre-submission checks
"""
