"""The ``popscore`` command: one module per group of subcommands, wired in ``main``.

    main.py      the parser, settings, and what an error means for the exit status
    service.py   consume, score, replay-dlq          (the service: ``consumer``)
    produce.py   produce (JSONL or synthetic releases; the demo's producer)
    model.py     train, evaluate, export             (``popscore.training``)
    bench.py     bench                               (``popscore.bench``; not in the image)
    report.py    the demo's table of scores and metrics summary

Heavy modules (torch, the trainer, the benchmark) are imported inside the handlers, so
``popscore --help`` answers at once.
"""
