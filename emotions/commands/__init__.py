"""The subcommands of ``emotions``, one module each (as accelerate's ``commands/``): a function that
adds the command's flags to its parser, and a thin function that calls the library with them. The
library never sees argparse; heavy imports (torch, Ray) stay inside the functions, so building the
parser (``emotions --help``) is fast.
"""

from __future__ import annotations

from emotions.commands import ablate, evaluate, nightly, quickstart, report, tag, train, tune

# name: (help, add the flags to a parser, run with the parsed args -> exit status)
COMMANDS = {
    "train": (train.HELP, train.add_train_arguments, train.run_train),
    "evaluate": (evaluate.HELP, evaluate.add_evaluate_arguments, evaluate.run_evaluate),
    "tag": (tag.HELP, tag.add_tag_arguments, tag.run_tag),
    "nightly": (nightly.HELP, nightly.add_nightly_arguments, nightly.run_nightly),
    "report": (report.HELP, report.add_report_arguments, report.run_report),
    "tune": (tune.HELP, tune.add_tune_arguments, tune.run_tune),
    "ablate": (ablate.HELP, ablate.add_ablate_arguments, ablate.run_ablate),
    "quickstart": (quickstart.HELP, quickstart.add_quickstart_arguments, quickstart.run_quickstart),
}
