// A worker thread of bench/inference.ts (plain JavaScript: a worker thread does not inherit tsx's loader):
// one autocannon run, its options in workerData, posting back its counts and the response time of every 2xx
// response in milliseconds, unrounded. autocannon's own latency histogram keeps whole milliseconds (0.7 ms
// counts as 0), too coarse for one connection without queueing. In a worker thread autocannon returns its
// raw result, whose latency and rate histograms are left for a main thread to aggregate: the counts are taken
// from it, the latencies from the responses.
import { parentPort, workerData } from 'node:worker_threads'
import autocannon from 'autocannon'

const times = []
const run = autocannon(workerData)
run.on('response', (_client, statusCode, _bytes, responseTime) => {
  if (statusCode >= 200 && statusCode < 300) times.push(responseTime)
})
const { totalCompletedRequests, duration, non2xx, errors, timeouts } = await run
parentPort.postMessage({ times, requests: totalCompletedRequests, duration, non2xx, errors, timeouts })
