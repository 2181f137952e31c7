"""eplb inside the serving engines, one module per engine; none is imported until used.

- ``eplb.integrations.vllm``: a vLLM EPLB policy (current 6-argument interface and the older
  3-tuple one) and ``install()``, which makes vLLM plan with eplb without editing vLLM;
- ``eplb.integrations.sglang``: the server flags an ``--init-expert-location`` file needs, a check
  that a file fits the model and the EP group, and ``install()`` for SGLang's online ``--enable-eplb``;
- ``eplb.integrations.trtllm``: the MoE layer ids a TensorRT-LLM model has (MTP layers included);
- ``eplb.integrations.commands``: the CLI commands built on them.

The engines are imported only inside the functions that patch them, so this package needs none of
them installed.
"""
