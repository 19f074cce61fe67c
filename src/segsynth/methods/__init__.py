"""The methods segsynth implements, each a package of its own stages and arms.

The generic stages (data, training, evaluation, synthesis, generators) know no
method; a method combines them (methods/base.py) and adds what is its own
(FreeMask: class statistics, hardness plan, pixel filter). `segsynth run`
finds them by name in `segsynth.run.METHODS`.
"""
