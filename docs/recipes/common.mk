# Shared settings of the recipes: every recipe is `make -C docs/recipes/<name>` and every
# step is one cllm command. Override any of these on the command line, e.g. CHUNKS=4.
CLLM    ?= cllm
BASE    ?= smollm2-135m
CHUNKS  ?= 16
CALIB   ?= 64
SEQLEN  ?= 512
OUT     ?= out
# a fixed provenance timestamp: a deterministic step run again writes identical bytes
export SOURCE_DATE_EPOCH ?= 1767225600

CAL  = --calib-samples $(CALIB) --calib-seqlen $(SEQLEN)
EVAL = $(CLLM) eval -b auto --chunks $(CHUNKS) --json

# a failed step leaves no half-written target behind (cllm's own outputs are atomic already)
.DELETE_ON_ERROR:
.SECONDARY:
