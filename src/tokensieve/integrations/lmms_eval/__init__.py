"""tokensieve as an lmms-eval model (``lmms-eval --model tokensieve ...``) and the shipped image
tasks as lmms-eval tasks (``tokensieve export-lmms-tasks``). See ``docs/lmms_eval.md``.

Modules: ``manifest`` (the registration lmms-eval finds through the ``lmms_eval.models`` entry point),
``model`` (the lmms-eval model classes), ``model_args`` (``--model_args`` read into settings),
``runner`` (loading, prompting, pruned generation and the per-sample report, without lmms-eval),
``export`` (the task suite written as lmms-eval task folders) and ``task_utils`` (the functions the
exported YAMLs name, copied next to them).

Nothing here imports lmms-eval at package import; only ``manifest`` and ``model`` need it.
"""
