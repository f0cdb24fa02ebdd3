"""The record script of a configuration: pgolf's own modules flattened into one `train_gpt.py`, and its
code bytes counted the records' way (docs/records/record-stack.md §4.7).

It reads pgolf's source files and never imports what it flattens, so it sits below the training and
quantisation code that ask it for `code_bytes(cfg)`.

bundle.py      the closure of pgolf.export.record for one configuration, flattened into one readable script
closure.py     reading the modules the record pipeline reaches (bindings, imports, registry trims)
scopes.py      the name resolution the flattening needs
specialise.py  the flattened code specialised to the baked configuration (facts.py, walker.py: what is
               known of each name; fold.py: constant folding and dead code)
codebytes.py   code bytes the records' way, on the exported script (`code_bytes(cfg)`)
"""
