// Command kstatus prints what sigs.k8s.io/cli-utils' kstatus library (used by Flux, Config Sync and
// `kubectl wait`-style tooling) computes for each Kubernetes object given on stdin: one JSON array of objects in,
// one JSON array of {"status", "message", "conditions"} out, in the same order. Used by
// tests/unit/test_kstatus.py; it talks to no API server.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type result struct {
	Status     string   `json:"status"`
	Message    string   `json:"message"`
	Conditions []string `json:"conditions"`
}

func main() {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail(err)
	}
	// apimachinery's decoder keeps integers as int64, as objects read from the API server have them.
	var objects []map[string]interface{}
	if err := utiljson.Unmarshal(data, &objects); err != nil {
		fail(err)
	}
	results := make([]result, 0, len(objects))
	for _, obj := range objects {
		res, err := status.Compute(&unstructured.Unstructured{Object: obj})
		if err != nil {
			fail(err)
		}
		conditions := []string{}
		for _, c := range res.Conditions {
			conditions = append(conditions, fmt.Sprintf("%s=%s", c.Type, c.Status))
		}
		results = append(results, result{Status: res.Status.String(), Message: res.Message, Conditions: conditions})
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "kstatus:", err)
	os.Exit(1)
}
