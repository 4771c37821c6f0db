# dcp, run from its TypeScript sources through tsx (there is no build step). Used by docker-compose.yml.
FROM node:20-bookworm-slim

WORKDIR /app

# Dependencies first, so a source change does not reinstall them. `.npmrc` carries
# `onnxruntime-node-install=skip`: onnxruntime-node's install script would otherwise try to download CUDA
# binaries (the CPU backend ships inside the package). Install scripts must still run (embedded-postgres,
# esbuild), so no --ignore-scripts. tsx is a runtime dependency; dev dependencies are left out.
COPY package.json package-lock.json .npmrc ./
RUN npm ci --omit=dev && npm cache clean --force

COPY . .

ARG DCP_COMMIT=""
ENV DCP_COMMIT=${DCP_COMMIT} \
    NODE_ENV=production \
    PORT=3000 \
    DATA_DIR=/data
# The blob store and any local state live in /data; run as the image's unprivileged `node` user.
RUN mkdir -p /data && chown node:node /data
VOLUME ["/data"]
USER node
EXPOSE 3000

CMD ["node", "bin/dcp.js", "start"]
