// Validates Prometheus Operator resources (PodMonitor, PrometheusRule) against the operator's
// published schemas, offline. Reads a JSON array of manifests on stdin; prints one line per
// resource and exits 1 if any is invalid or of a kind this script does not know.
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";

const models = { PodMonitor, PrometheusRule };
let input = "";
for await (const chunk of process.stdin) input += chunk;

let failed = false;
for (const doc of JSON.parse(input)) {
  const name = `${doc.kind}/${doc.metadata?.name}`;
  const Model = models[doc.kind];
  if (!Model || doc.apiVersion !== Model.apiVersion) {
    console.log(`ERROR ${name}: no schema for ${doc.apiVersion} ${doc.kind}`);
    failed = true;
    continue;
  }
  try {
    new Model(doc).validate();
    console.log(`ok ${name}`);
  } catch (error) {
    console.log(`ERROR ${name}: ${error.message}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
