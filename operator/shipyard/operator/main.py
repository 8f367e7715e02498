"""`shipyard-operator`: the operator's entry point (parses flags, starts Kopf, the metrics and liveness endpoints).

    shipyard-operator --all-namespaces
    shipyard-operator --namespace ml --namespace staging --liveness http://0.0.0.0:8080/healthz

Peering: by default the operator runs standalone (one replica). With ``--peering NAME`` several replicas
coordinate through a Kopf peering object: the one with the highest ``--priority`` acts, the others stand by.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import kopf
import prometheus_client

from shipyard.operator import egress, kube, notifications


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shipyard-operator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[],
                       help="watch this namespace (repeatable; globs like 'ml-*' allowed)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"),
                        help="kubeconfig file (default: $KUBECONFIG, else in-cluster)")
    parser.add_argument("--liveness", default=os.environ.get("SHIPYARD_LIVENESS", "http://0.0.0.0:8081/healthz"),
                        help="liveness endpoint URL served by Kopf ('' to disable)")
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("SHIPYARD_METRICS_PORT", "9090")),
                        help="port of the operator's /metrics (0 to disable)")
    parser.add_argument("--metrics-address", default="0.0.0.0")
    parser.add_argument("--workers", type=int, default=128,
                        help="parallel reconcile workers (reconciles wait on the API server, not the CPU)")
    parser.add_argument("--api-transport", choices=kube.TRANSPORTS, default="aiohttp",
                        help="HTTP client under the operator's own API calls (Kopf's watches use aiohttp either way)")
    parser.add_argument("--prometheus-address", default=os.environ.get("SHIPYARD_PROMETHEUS_ADDRESS"),
                        help="default Prometheus for analysis (else built-in metrics are scraped from the pods)")
    parser.add_argument("--allowed-prometheus-address", action="append", dest="allowed_prometheus_addresses",
                        default=[a.strip() for a in os.environ.get(egress.ENV_ALLOWED, "").split(",") if a.strip()],
                        help="a further Prometheus address a ModelDeployment may name (repeatable; matched by scheme, "
                             "host, port and path prefix; env SHIPYARD_ALLOWED_PROMETHEUS_ADDRESSES, comma-separated; "
                             "see docs/security.md)")
    parser.add_argument("--activator-image", default=os.environ.get("SHIPYARD_ACTIVATOR_IMAGE"),
                        help="image of the activator (shipyard-activator: the operator's own image) that holds a "
                             "scaled-to-zero model's requests until a pod is Ready (autoscaling minReplicas 0; "
                             "default $SHIPYARD_ACTIVATOR_IMAGE; none: such models keep at least 1 replica)")
    parser.add_argument("--fetch-image", default=os.environ.get("SHIPYARD_FETCH_IMAGE"),
                        help="an image with shipyard-runtime (Shipyard's runtime image) for the download step of "
                             "models in s3://, https:// or oci:// served by another runtime (Shipyard's own server "
                             "downloads with its own image; default $SHIPYARD_FETCH_IMAGE)")
    parser.add_argument("--model-cache-path", default=os.environ.get("SHIPYARD_MODEL_CACHE_PATH"),
                        help="a directory on every node (a hostPath) where download steps keep models by digest, so "
                             "that the pods of a node download a model once; needs a namespace Pod Security level that "
                             "allows hostPath (privileged) and a directory writable by uid 10001 (default "
                             "$SHIPYARD_MODEL_CACHE_PATH; none: each pod downloads; see docs/model-sources.md)")
    parser.add_argument("--notifications-namespace",
                        default=os.environ.get("SHIPYARD_NOTIFICATIONS_NAMESPACE") or os.environ.get("POD_NAMESPACE"),
                        help="the operator's own namespace, holding the webhook notifications' ConfigMap and Secret "
                             "(default: $SHIPYARD_NOTIFICATIONS_NAMESPACE, else $POD_NAMESPACE; none: no "
                             "notifications; see docs/notifications.md)")
    parser.add_argument("--notifications-configmap", default=notifications.DEFAULT_NAME,
                        help="the ConfigMap listing the notification targets")
    parser.add_argument("--notifications-secret", default=notifications.DEFAULT_NAME,
                        help="the one Secret holding the targets' URLs and the HMAC key")
    parser.add_argument("--notifications-refresh-seconds", type=float, default=30.0,
                        help="how often the ConfigMap and the Secret are read again (changes apply without a restart)")
    parser.add_argument("--notifications-queue-size", type=int, default=1000,
                        help="notifications waiting at most (beyond: dropped and counted)")
    parser.add_argument("--peering", default=None, help="Kopf peering object name (enables active/standby)")
    parser.add_argument("--priority", type=int, default=0, help="peering priority (distinct per replica)")
    parser.add_argument("--log-level", default=os.environ.get("SHIPYARD_LOG_LEVEL", "INFO"))
    return parser


def build_notification_settings(args: argparse.Namespace) -> notifications.Settings | None:
    if not args.notifications_namespace:
        return None
    return notifications.Settings(namespace=args.notifications_namespace, configmap=args.notifications_configmap,
                                  secret=args.notifications_secret,
                                  refresh_seconds=max(0.5, args.notifications_refresh_seconds),
                                  queue_size=max(1, args.notifications_queue_size))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for address, source in ([(args.prometheus_address, "--prometheus-address")] if args.prometheus_address else []) \
            + [(a, "--allowed-prometheus-address") for a in args.allowed_prometheus_addresses]:
        _, problems = egress.parse_address_list(address, source, userinfo=source == "--prometheus-address")
        if problems:
            parser.error("; ".join(problems))
    kopf.configure(verbose=args.log_level.upper() == "DEBUG")
    logging.getLogger().setLevel(args.log_level.upper())
    for noisy in ("httpx", "httpx2", "httpcore", "aiohttp.access", "kopf.objects"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    from shipyard.operator import handlers  # noqa: F401  (registers the handlers)

    if args.metrics_port:
        prometheus_client.start_http_server(args.metrics_port, addr=args.metrics_address)
    memo = kopf.Memo(options={"kubeconfig": args.kubeconfig, "workers": args.workers,
                              "api_transport": args.api_transport,
                              "prometheus_address": args.prometheus_address,
                              "activator_image": args.activator_image,
                              "fetch_image": args.fetch_image, "model_cache_path": args.model_cache_path,
                              "allowed_prometheus_addresses": args.allowed_prometheus_addresses,
                              "notifications": build_notification_settings(args)})
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=args.priority,
        liveness_endpoint=args.liveness or None,
        memo=memo,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
