"""What the teacher service and the student side both do with a model, owned by neither.

The teacher's numbers and the student's are computed by the same code, so they agree by
construction: the tiled LM-head scoring (scoring), the head spec and its logit transforms
(head), the BLAS streams the CPU head matmul runs on (cpu_gemm), where generation stops
(eos), and the embedded default model (embedded). Layers import one way:
opd.shared <- opd.modeling <- opd.server, opd.client; this package imports neither of the last
two.
"""
