# Reproduce the shipped tiny-avatar models from scratch:  make model
# Every stage resumes from its newest checkpoint, so an interrupted `make model` continues.
PY ?= .venv/bin/python
ifeq ($(shell command -v $(PY)),)
# (every recipe failed, one after another, with "No such file or directory" of .venv/bin/python)
$(error $(PY) not found: run `bash scripts/setup.sh` first to make .venv, or name a Python with PY=)
endif
RUNS ?= runs/tiny-avatar
DATA ?= data/world
CLIPS ?= 600
DISTILL = $(PY) -m streamgen distill
# the configs name runs/tiny-avatar and data/world: each stage is given RUNS= and DATA= by --set
TEACHER = $(RUNS)/teacher/model

.PHONY: model train ship data autoencoder latents teacher ode self_forcing self_forcing_last_step chunk results clean-runs

model: train ship

train: chunk self_forcing self_forcing_last_step

# copy the trained models into streamgen/assets/models (float16 DiT weights)
ship:
	$(PY) -m distill.ship $(RUNS)/self_forcing/model tiny-avatar
	$(PY) -m distill.ship $(RUNS)/chunk/model tiny-avatar-chunk
	$(PY) -m distill.ship $(RUNS)/teacher/model tiny-avatar-teacher

data: $(DATA)/manifest.json
$(DATA)/manifest.json:
	$(PY) -m streamgen data make --out $(DATA) --clips $(CLIPS) --seed 0 --size 64 --seconds 4 --workers 2

autoencoder: $(RUNS)/autoencoder/model/vae.safetensors
$(RUNS)/autoencoder/model/vae.safetensors: $(DATA)/manifest.json
	$(DISTILL) autoencoder --config tiny-avatar --resume --set data.root=$(DATA) --set run.out=$(RUNS)/autoencoder

latents: $(DATA)/latents/tiny-vae-deep/bank-test.safetensors
$(DATA)/latents/tiny-vae-deep/bank-test.safetensors: $(RUNS)/autoencoder/model/vae.safetensors
	$(DISTILL) latents --config tiny-avatar --set data.root=$(DATA) --set run.out=$(RUNS)/latents \
		--set model.vae=$(RUNS)/autoencoder/model

teacher: $(RUNS)/teacher/model/model.json
$(RUNS)/teacher/model/model.json: $(DATA)/latents/tiny-vae-deep/bank-test.safetensors
	$(DISTILL) teacher --config tiny-avatar --resume --set data.root=$(DATA) --set run.out=$(RUNS)/teacher \
		--set model.vae=$(RUNS)/autoencoder/model

ode: $(RUNS)/ode/model/model.json
$(RUNS)/ode/model/model.json: $(RUNS)/teacher/model/model.json
	$(DISTILL) ode --config tiny-avatar --resume --set data.root=$(DATA) --set run.out=$(RUNS)/ode \
		--set model.init=$(TEACHER) --set ode.teacher=$(TEACHER)

self_forcing: $(RUNS)/self_forcing/model/model.json
$(RUNS)/self_forcing/model/model.json: $(RUNS)/ode/model/model.json
	$(DISTILL) self_forcing --config tiny-avatar --resume --set data.root=$(DATA) --set run.out=$(RUNS)/self_forcing \
		--set model.init=$(RUNS)/ode/model --set self_forcing.teacher=$(TEACHER)

# the same student fine-tuned to keep each chunk's cache from its last step (a results row, not shipped)
self_forcing_last_step: $(RUNS)/self_forcing_last_step/model/model.json
$(RUNS)/self_forcing_last_step/model/model.json: $(RUNS)/self_forcing/model/model.json
	$(DISTILL) self_forcing --config tiny-avatar-last-step --resume --set data.root=$(DATA) \
		--set run.out=$(RUNS)/self_forcing_last_step --set model.init=$(RUNS)/self_forcing/model \
		--set self_forcing.teacher=$(TEACHER)

chunk: $(RUNS)/chunk/model/model.json
$(RUNS)/chunk/model/model.json: $(RUNS)/ode/model/model.json
	$(DISTILL) chunk --config tiny-avatar --resume --set data.root=$(DATA) --set run.out=$(RUNS)/chunk \
		--set model.init=$(RUNS)/ode/model --set chunk.teacher=$(TEACHER)

# docs/results.md from `streamgen eval` of every row, its reports under RUNS (they were in ./runs/results
# whatever RUNS said)
results:
	$(PY) -m distill.results --runs $(RUNS) --out $(RUNS)/results --doc docs/results.md

clean-runs:
	rm -rf $(RUNS)
