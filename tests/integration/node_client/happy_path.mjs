// A trainer written in Node.js: @grpc/grpc-js with the contracts loaded at run time from
// protos/ by @grpc/proto-loader, nothing generated. It drives the tracking and registry
// happy path, a client stream and a server stream among it, asserting every answer, and
// prints the ids it made as one JSON line for the caller to check from another language.
//
//   node happy_path.mjs <host:port> <protos dir> <unique suffix>
import assert from "node:assert/strict";
import { createHash, randomUUID } from "node:crypto";
import path from "node:path";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const [target, protosDir, suffix] = process.argv.slice(2);
assert.ok(target && protosDir && suffix, "usage: happy_path.mjs <host:port> <protos dir> <suffix>");

const definition = protoLoader.loadSync(
  ["mlflow_sidecar/v1/tracking.proto", "mlflow_sidecar/v1/registry.proto"],
  { includeDirs: [path.resolve(protosDir)], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true },
);
const v1 = grpc.loadPackageDefinition(definition).mlflow_sidecar.v1;
const credentials = grpc.credentials.createInsecure();
const tracking = new v1.ExperimentTrackingService(target, credentials);
const registry = new v1.ModelRegistryService(target, credentials);

const deadline = () => ({ deadline: Date.now() + 60_000 });

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, deadline(), (error, response) => (error ? reject(error) : resolve(response)));
  });
}

// A client stream: write every message, half-close, await the one answer.
function clientStream(client, method, messages) {
  return new Promise((resolve, reject) => {
    const call = client[method](deadline(), (error, response) => (error ? reject(error) : resolve(response)));
    for (const message of messages) call.write(message);
    call.end();
  });
}

// A server stream: every message until the server ends the call.
function serverStream(client, method, request) {
  return new Promise((resolve, reject) => {
    const messages = [];
    const call = client[method](request, deadline());
    call.on("data", (message) => messages.push(message));
    call.on("error", reject);
    call.on("end", () => resolve(messages));
  });
}

const sha256 = (bytes) => createHash("sha256").update(bytes).digest("hex");

// Tracking: an experiment, a run, params, metrics streamed and read back, an artifact up and down.
const experimentName = `node-${suffix}`;
const { experiment } = await unary(tracking, "CreateExperiment", { name: experimentName });
assert.equal(experiment.name, experimentName);
assert.match(experiment.experiment_id, /^\d+$/);

const startRequest = { experiment_id: experiment.experiment_id, run_name: "node-run", request_id: randomUUID() };
const { run } = await unary(tracking, "StartRun", startRequest);
const runId = run.info.run_id;
assert.match(runId, /^[0-9a-f]{32}$/);
assert.equal(run.info.status, "RUN_STATUS_RUNNING");
// A retried StartRun (same request_id) is the same run, never a second one.
const again = await unary(tracking, "StartRun", startRequest);
assert.equal(again.run.info.run_id, runId);

await unary(tracking, "LogParams", { run_id: runId, params: { lr: "0.001", gamma: "0.99" } });

const rewards = [0.5, 1.5, 2.5, 3.5, 4.5];
const streamed = await clientStream(
  tracking,
  "StreamMetrics",
  rewards.map((value, step) => ({ points: [{ run_id: runId, key: "reward", value, step: String(step) }] })),
);
assert.equal(streamed.accepted_points, String(rewards.length));
const flushed = await unary(tracking, "FlushMetrics", { run_id: runId });
assert.equal(flushed.pending_points, "0");
assert.equal(flushed.dead_letter_points, "0");
const history = await unary(tracking, "GetMetricHistory", { run_id: runId, metric_key: "reward" });
assert.deepEqual(
  history.metrics.map((m) => [m.step, m.value]),
  rewards.map((value, step) => [String(step), value]),
);

const content = Buffer.from(`hello from node ${suffix}\n`);
const half = Math.floor(content.length / 2);
const uploaded = await clientStream(tracking, "UploadArtifact", [
  { header: { run_id: runId, artifact_path: "notes/hello.txt", size_bytes: String(content.length) } },
  { chunk: content.subarray(0, half) },
  { chunk: content.subarray(half) },
  { trailer: { sha256: sha256(content) } },
]);
assert.equal(uploaded.artifact_path, "notes/hello.txt");
assert.equal(uploaded.size_bytes, String(content.length));
assert.equal(uploaded.sha256, sha256(content));

const download = await serverStream(tracking, "DownloadArtifact", { run_id: runId, artifact_path: "notes/hello.txt" });
assert.equal(download[0].payload, "header");
assert.equal(download[0].header.size_bytes, String(content.length));
assert.equal(download.at(-1).payload, "trailer");
const received = Buffer.concat(download.filter((m) => m.payload === "chunk").map((m) => m.chunk));
assert.deepEqual(received, content);
assert.equal(download.at(-1).trailer.sha256, sha256(received));

const ended = await unary(tracking, "EndRun", { run_id: runId, status: "RUN_STATUS_FINISHED" });
assert.equal(ended.run.info.status, "RUN_STATUS_FINISHED");
const { run: read } = await unary(tracking, "GetRun", { run_id: runId });
assert.deepEqual({ ...read.data.params }, { lr: "0.001", gamma: "0.99" });

// Registry: a model, a version from the run's artifacts, the champion alias, read back by alias.
const modelName = `node-model-${suffix}`;
const { registered_model: model } = await unary(registry, "CreateRegisteredModel", { name: modelName });
assert.equal(model.name, modelName);
const { model_version: version } = await unary(registry, "CreateModelVersion", {
  name: modelName,
  source: `runs:/${runId}/notes`,
  run_id: runId,
  tags: { language: "node" },
  request_id: randomUUID(),
});
assert.equal(version.version, "1");
assert.equal(version.run_id, runId);
await unary(registry, "SetModelAlias", { name: modelName, alias: "champion", version: version.version });
const { model_version: champion } = await unary(registry, "GetModelVersionByAlias", { name: modelName, alias: "champion" });
assert.equal(champion.version, version.version);
assert.deepEqual(champion.aliases, ["champion"]);
assert.equal(champion.tags.language, "node");

// A failure carries its status code to Node too: an unknown run is NOT_FOUND.
await assert.rejects(unary(tracking, "GetRun", { run_id: "0".repeat(32) }), (error) => error.code === grpc.status.NOT_FOUND);

tracking.close();
registry.close();
console.log(JSON.stringify({ experiment_id: experiment.experiment_id, run_id: runId, model: modelName, version: version.version }));
