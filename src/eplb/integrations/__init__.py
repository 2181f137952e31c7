"""eplb inside the serving engines, one module per engine; none is imported until used.

- ``eplb.integrations.vllm``: a vLLM EPLB policy (current 6-argument interface and the older
  3-tuple one), ``install()``, which makes vLLM plan with eplb without editing vLLM, and the check
  that an initial placement file fits vLLM's map;
- ``eplb.integrations.sglang``: the server flags an ``--init-expert-location`` file needs, a check
  that a file fits the model and the EP group, and ``install()`` for SGLang's online ``--enable-eplb``;
- ``eplb.integrations.trtllm``: the check that a load-balancer YAML fits a TensorRT-LLM model
  (every MoE layer id, MTP layers included) and its EP group;
- ``eplb.integrations.layers``: the model layers an engine keeps an expert map for;
- ``eplb.integrations.commands``: the CLI commands built on them.

The engines are imported only inside the functions that patch them, so this package needs none of
them installed.
"""
