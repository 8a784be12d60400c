# The homeserver image used by compose.yaml.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p homeserver

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /data --create-home obmin
COPY --from=build /src/target/release/homeserver /usr/local/bin/homeserver
USER obmin
WORKDIR /data
EXPOSE 8008
STOPSIGNAL SIGTERM
ENTRYPOINT ["homeserver"]
CMD ["serve"]
