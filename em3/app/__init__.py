"""The app layer: the composition roots that wire every package together.

``cli`` (the ``em3`` command), ``demo`` (``em3 demo``), ``services`` (the embedded
broker and Redis: ``em3 services``, and the tests' and benchmarks' fixtures) and
``configdoc`` (the generated configuration reference). Nothing below imports this
package (``tests/unit/test_layers.py``); the rest of :mod:`em3` is the core that every
layer shares: event types, codec, configs, the model and the snapshot format.
"""
