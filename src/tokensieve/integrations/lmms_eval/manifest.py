"""The lmms-eval registration of tokensieve, loaded through the ``lmms_eval.models`` entry point.

lmms-eval 0.7.3 builds its model registry from that entry-point group while ``lmms_eval.models`` is
still being imported, so this module imports only ``lmms_eval.models.registry_v2`` (anything that
imports ``lmms_eval.models`` from here would see a half-initialised module). The classes are named by
path and imported only when ``--model tokensieve`` is resolved. A manifest that fails to import hides
every plugin after it (lmms-eval logs one warning), which is another reason to keep this import-light.

One manifest with both paths: lmms-eval runs the chat class (requests carry the task's messages)
unless ``--force_simple`` is given, which runs the simple class (requests carry the prompt text and
the images).
"""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(
    model_id="tokensieve",
    simple_class_path="tokensieve.integrations.lmms_eval.model.TokensieveSimple",
    chat_class_path="tokensieve.integrations.lmms_eval.model.TokensieveChat",
)
