"""A real Kubernetes control plane on this host, for end-to-end tests.

etcd, kube-apiserver and kube-controller-manager run in the root network namespace on loopback; kube-proxy runs
inside a lab "node" namespace and reaches the API server through a small forwarder. No kubelet, no container
runtime: pods stay Pending, which is all the Service plumbing needs.
"""
