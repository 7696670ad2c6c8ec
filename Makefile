# The README's two commands. Both use the release profile so gRPC's C core compiles once.
.PHONY: demo test deps bench

deps:
	@bash .ci/install-deps

demo: deps
	cargo run --release -- demo

test: deps
	cargo test --release --no-fail-fast

bench: deps
	cargo bench --bench fanout --bench fanout_latency --bench fanout_tls --bench e2e --bench ws_fanout --bench ws_idle
