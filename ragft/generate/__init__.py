"""ragft generate: the generation engines `ragft eval` and `ragft serve` share.

`engine` is the contract (requests, sampling settings, deltas, the `Engine` interface and the checks every
engine applies); `transformers_engine` is ragft's own continuously batched decode loop (with `decode_group`,
`sampling` and `detokenize`), `vllm_engine` the same contract on vLLM. Nothing here knows about HTTP, Ray
or the eval systems: callers turn their own inputs into `GenerationRequest`s.
"""
