"""The ``vllm.general_plugins`` entry point: registers the ``splice`` load format in every vLLM process."""


def register() -> None:
    from . import loader  # noqa: F401  (registration happens on import)
