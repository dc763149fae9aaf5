"""Serving a patched model behind an unmodified vLLM (``vllm serve --load-format splice``).

* :mod:`.plugin`          the ``vllm.general_plugins`` entry: registers the ``splice`` load format
* :mod:`.loader`          the model loader: vLLM's default loader, then the recipe installed
* :mod:`.options`         the loader's ``--model-loader-extra-config`` keys
* :mod:`.request_params`  the steering a request asks for in ``vllm_xargs`` and its cache salt
* :mod:`.middleware`      the HTTP side: validates steering (HTTP 400), sets the cache salt
* :mod:`.request_rows`    the ``vllm.logits_processors`` entry: batch rows -> steering slots
* :mod:`.steering_state`  the worker-side tables, slot pool and per-token buffers
* :mod:`.model`           what is installed on vLLM's model (steering sites, static skips)
* :mod:`.launch`          the server command (``splice serve``), start / wait / stop
"""
