# Everything runs inside .venv, which this Makefile creates and fills from pyproject.toml.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed-stamp
PROTO_FILES := $(shell find protos -name '*.proto' | sort)

.PHONY: help install proto check-generated lint typecheck test test-unit test-integration test-e2e run token card mail stock-level bench clean

help:
	@echo "make run    - start PostgreSQL, localstripe, the gRPC server and Envoy (Ctrl-C stops all)"
	@echo "make run TLS=1 - the same over TLS (mutual on the gRPC port), certificates in .data/tls/"
	@echo "make test   - lint, type-check, stale-generated and breaking-change checks, whole test suite"
	@echo "make proto  - regenerate generated/ from protos/"
	@echo "make token ROLE=admin SUB=alice [EMAIL=alice@example.com] - print a development JWT"
	@echo "make card CARD=4242424242424242 - print a PaymentMethod id from the running localstripe"
	@echo "                                  (4000000000000341 is declined when charged)"
	@echo "make mail   - the emails make run's SMTP sink kept; make mail N=1 prints the latest"
	@echo "make events - tail make run's events, decoded; FROM=start for the stored ones too,"
	@echo "              STREAM=MARKETPLACE_DLQ for the dead letters, STREAM=WAREHOUSE"
	@echo "make stock-level SKU=TEE-BLACK-M ON_HAND=40 [WAREHOUSE=main] - publish a warehouse level"
	@echo "make bench  - throughput, latency and CPU against same-run baselines (not part of test)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# generated/ is committed; this is the only way it is written.
proto: $(STAMP)
	$(PY) -m server.tools.protogen generated

# Fails when `make proto` would change anything in generated/.
check-generated: $(STAMP)
	$(PY) -m server.tools.protogen --check generated

# buf reads the image in generated/, so it must be current first (rules: buf.yaml).
lint: $(STAMP) check-generated
	$(BIN)/ruff check server devstack clients tests migrations
	$(BIN)/ruff format --check server devstack clients tests migrations
	$(BIN)/buf lint generated/marketplace.binpb --path marketplace --config buf.yaml

# Fails when the protos break clients of any commit in BREAKING_AGAINST: compares the current
# image with the one committed there, and says so when there is none (first commit, shallow
# clone). HEAD~1 is the previous commit; RELEASED_CONTRACT is the last landed API, so a break
# followed by other commits is still caught. Move it to each landed submission (its checks
# passed against the one before); a deliberate break needs a new API version (v2) instead.
RELEASED_CONTRACT := ebacc63
BREAKING_AGAINST ?= HEAD~1 $(RELEASED_CONTRACT)
.PHONY: breaking
breaking: $(STAMP) check-generated
	@against=$$(mktemp) && trap 'rm -f "$$against"' EXIT && failed=0 && \
	for ref in $(BREAKING_AGAINST); do \
	  if ! git rev-parse --quiet --verify "$$ref^{commit}" >/dev/null; then \
	    echo "buf breaking: SKIPPED, no commit $$ref (first commit or shallow clone)"; \
	  elif ! git show "$$ref:generated/marketplace.binpb" >"$$against" 2>/dev/null; then \
	    echo "buf breaking: SKIPPED, $$ref has no generated/marketplace.binpb"; \
	  else \
	    echo "buf breaking: generated/marketplace.binpb against $$ref's" \
	      "($$(git rev-parse --short "$$ref"))"; \
	    $(BIN)/buf breaking generated/marketplace.binpb --against "$$against#format=binpb" \
	      --path marketplace --config buf.yaml || failed=1; \
	  fi; \
	done; exit $$failed

typecheck: $(STAMP)
	$(BIN)/mypy server devstack clients

test: $(STAMP) check-generated lint breaking typecheck
	$(BIN)/pytest -q tests

test-unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

test-integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

test-e2e: $(STAMP)
	$(BIN)/pytest -q tests/e2e

# TLS=1: a development CA and certificates under .data/tls/; plaintext on loopback otherwise.
# WAREHOUSE=0: without the stand-in warehouse (WAREHOUSE_SHIP_DELAY: its seconds to ship).
# REPLICAS=3: server replicas behind Envoy; NATS_CLUSTER=3: a JetStream cluster;
# PG_REPLICA=1: a streaming replica for catalog reads (docs/operations.md, the fleet).
TLS ?= 0
WAREHOUSE ?=
REPLICAS ?= 1
NATS_CLUSTER ?= 1
PG_REPLICA ?= 0
run: $(STAMP)
	$(PY) -m devstack $(if $(filter-out 0,$(TLS)),--tls) $(if $(filter 0,$(WAREHOUSE)),--no-warehouse) \
	  --replicas $(REPLICAS) --nats-cluster $(NATS_CLUSTER) $(if $(filter-out 0,$(PG_REPLICA)),--pg-replica)

# The span tree of one order from make run's traces (.data/traces.jsonl).
ORDER ?=
.PHONY: trace
trace: $(STAMP)
	@$(PY) -m server.tools.trace '$(ORDER)'

ROLE ?= customer
SUB ?= demo-customer
# The token's email claim, where its orders' notifications go: <SUB>@example.com unless set;
# EMAIL=none gives a token without one.
EMAIL ?=
token: $(STAMP)
	@$(PY) -m devstack token --role '$(ROLE)' --sub '$(SUB)' \
	  $(if $(EMAIL),--email '$(if $(filter none,$(EMAIL)),,$(EMAIL))')

CARD ?= 4242424242424242
card: $(STAMP)
	@$(PY) -m devstack card --number '$(CARD)'

# The SMTP sink's messages (make run keeps them in .data/mail/): a list, newest first, or
# message N of it (N=1 the latest) as text; HTML=1 prints its HTML part.
N ?=
HTML ?= 0
mail: $(STAMP)
	@$(PY) -m devstack.mail $(if $(N),show '$(N)' $(if $(filter-out 0,$(HTML)),--html),list)

# Tails a stream of make run's NATS (NATS_URL for another), each event decoded from the
# descriptor set in generated/ by its Marketplace-Event-Type header: new ones, or with
# FROM=start every stored one first. Reads with a consumer of its own; nothing is acked.
.PHONY: events
FROM ?= new
STREAM ?= MARKETPLACE
events: $(STAMP)
	@$(PY) -m server.tools.events_tail --from '$(FROM)' --stream '$(STREAM)'

# A stock level as the warehouse sends it, on warehouse.stock_levels of make run's NATS
# (NATS_URL elsewhere): the catalog follows once the server applies it.
SKU ?=
ON_HAND ?=
stock-level: $(STAMP)
	@$(PY) -m devstack.warehouse stock-level --sku '$(SKU)' --on-hand '$(ON_HAND)' \
	  --warehouse '$(or $(WAREHOUSE),main)'

bench: $(STAMP)
	$(PY) -m tests.bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
