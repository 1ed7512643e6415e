"""The offline evaluation harness behind eval.py: the task class and shared text pieces (base.py), the texts fetched
once (texts.py), passkey, needle-in-a-haystack and the registry of every task (tasks.py), RULER's synthetic tasks
(ruler.py), BABILong (babilong.py), and the post-hoc KV-cache reductions a full-attention model is compared with
(kv_policies.py: StreamingLLM, H2O, SnapKV)."""
