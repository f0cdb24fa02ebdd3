"""The lab side: what the notebooks and sweeps use on top of the core (data, model, train, quant, eval).

launch.py     torchrun child processes from a notebook, with the log streamed (multi-node in a Slurm job)
live.py       a training run followed while it runs (live loss figure, phases, progress lines)
sweep.py      `pgolf sweep`: a parameterised notebook once per seed x grid point (papermill)
slurm.py      `pgolf sweep --launcher slurm`: one submitit job per point, --dry-run scripts, --status
sweep_cli.py  the `pgolf sweep` command line over both launchers
registry.py   finished runs and TTT convergence records as DataFrames
stats.py      seed statistics and the challenge's significance test (`pgolf stats`)
plots.py      the standard figures
workbench.py  helpers the notebooks call (architecture tweaks, size estimates, their tables, widgets)
trials.py     short training trials from a notebook (train both, a grid of one tweak)
mainjob.py    `make run`: the sample corpus -> a trained run -> a figure

The core never imports from here (a test walks the imports).
"""
