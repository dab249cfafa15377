"""The meta step: the learnable temperatures, the hypergradient estimators and the controller that runs them.

``temperature`` (``Temperatures``: the log-temperature meta-parameters and their optimizer); ``estimators`` (the
interface and the built-in ``'mixture'``, ``'calibration'`` and ``'lookahead'`` estimators, whose maths is in
``mixture``, ``calibration`` and ``meta_step``); ``meta_parts`` (what they share: the training batch, the result
type, RNG replay, the look-ahead Jacobian); ``meta_controller`` (the optimizer hooks that run a meta step every
``meta_interval`` updates).
"""
