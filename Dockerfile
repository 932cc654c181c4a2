# Container image of the service. Builds with the same scripts as CI (Debian packages, native
# libraries from the PyPI wheels), then runs `serve` with models installed by `model-setup`
# into a volume. Not built in CI (no Docker engine there).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
ENV AVA_HOME=/opt/ava CARGO_TARGET_DIR=/opt/ava/target
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip \
 && ./scripts/install-deps.sh && cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libsonic0 libgomp1 espeak-ng-data libasound2 ca-certificates \
 && rm -rf /var/lib/apt/lists/* && useradd --system asterisk-voice-agent
COPY --from=build /opt/ava/target/release/asterisk-voice-agent /usr/bin/
COPY --from=build /opt/ava/lib/libvosk.so /opt/ava/lib/libonnxruntime.so.1 /usr/lib/asterisk-voice-agent/
COPY registry.json /usr/share/asterisk-voice-agent/registry.json
COPY systemd/config.toml /etc/asterisk-voice-agent/config.toml
# Listen on all interfaces inside the container; publish the port only to the PBX host.
RUN sed -i 's/^audiosocket_listen.*/audiosocket_listen = "0.0.0.0:8090"/' /etc/asterisk-voice-agent/config.toml
ENV PIPER_ESPEAKNG_DATA_DIRECTORY=/usr/lib/x86_64-linux-gnu
VOLUME /var/lib/asterisk-voice-agent/models
EXPOSE 8090
USER asterisk-voice-agent
CMD ["asterisk-voice-agent", "serve", "--config", "/etc/asterisk-voice-agent/config.toml"]
