"""Tools for running and analysing studies that compare fine-tuning selections.

The ``kappatune study`` command (guide: "Measure forgetting on your model") is built from
:mod:`~kappatune.study.config` (the study file), :mod:`~kappatune.study.data` (corpora),
:mod:`~kappatune.study.folder` (the results folder), :mod:`~kappatune.study.arms`,
:mod:`~kappatune.study.plan`, :mod:`~kappatune.study.run`, :mod:`~kappatune.study.frontier`,
:mod:`~kappatune.study.stats`, :mod:`~kappatune.study.report` and :mod:`~kappatune.study.command`;
:mod:`~kappatune.study.v2` reads the forgetting study v2's record and writes its report. Nothing is
imported here.
"""
