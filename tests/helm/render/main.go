// Command render renders a Helm chart the way `helm template` does, for the
// chart tests on machines without the helm binary: Go's text/template with
// sprig's functions plus Helm's own (include, tpl, toYaml, fromYaml, toJson,
// required, fail, lookup), the built-in objects .Values, .Release, .Chart,
// .Capabilities and .Template, and values files merged over values.yaml.
//
//	render [-name NAME] [-namespace NS] [-api-version V]... [-f values.yaml]... CHART_DIR
//
// It prints JSON: {"values": merged values, "manifests": [{"template", "object"}], "notes"}.
// Build it in GOPATH mode against Debian's packages:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o render ./tests/helm/render
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	"gopkg.in/yaml.v3"
)

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

// APIVersions answers .Capabilities.APIVersions.Has like Helm does.
type APIVersions []string

func (a APIVersions) Has(v string) bool {
	for _, x := range a {
		if x == v {
			return true
		}
	}
	return false
}

type manifest struct {
	Template string      `json:"template"`
	Object   interface{} `json:"object"`
}

type output struct {
	Values    map[string]interface{} `json:"values"`
	Manifests []manifest             `json:"manifests"`
	Notes     string                 `json:"notes"`
}

func readYAML(file string) (map[string]interface{}, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	out := map[string]interface{}{}
	if err := yaml.Unmarshal(data, &out); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	return out, nil
}

// merge lays src over dst as Helm coalesces values: maps merge key by key,
// anything else replaces, and null deletes the default.
func merge(dst, src map[string]interface{}) map[string]interface{} {
	for k, v := range src {
		if v == nil {
			delete(dst, k)
			continue
		}
		sm, sok := v.(map[string]interface{})
		dm, dok := dst[k].(map[string]interface{})
		if sok && dok {
			dst[k] = merge(dm, sm)
		} else {
			dst[k] = v
		}
	}
	return dst
}

func toYAML(v interface{}) string {
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(v); err != nil {
		return ""
	}
	return strings.TrimSuffix(buf.String(), "\n")
}

func run() error {
	name := flag.String("name", "release", "release name")
	namespace := flag.String("namespace", "default", "release namespace")
	var valueFiles, apiVersions listFlag
	flag.Var(&valueFiles, "f", "values file (repeatable, later ones win)")
	flag.Var(&apiVersions, "api-version", "extra API version for .Capabilities (repeatable)")
	flag.Parse()
	if flag.NArg() != 1 {
		return errors.New("usage: render [-f values.yaml]... CHART_DIR")
	}
	chartDir := flag.Arg(0)

	chart, err := readYAML(filepath.Join(chartDir, "Chart.yaml"))
	if err != nil {
		return err
	}
	values, err := readYAML(filepath.Join(chartDir, "values.yaml"))
	if err != nil {
		return err
	}
	for _, f := range valueFiles {
		v, err := readYAML(f)
		if err != nil {
			return err
		}
		values = merge(values, v)
	}
	chartName, _ := chart["name"].(string)
	basePath := chartName + "/templates"

	root := template.New("chart")
	funcs := sprig.TxtFuncMap()
	delete(funcs, "env")
	delete(funcs, "expandenv")
	funcs["toYaml"] = toYAML
	funcs["fromYaml"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := yaml.Unmarshal([]byte(s), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	funcs["toJson"] = func(v interface{}) string {
		b, err := json.Marshal(v)
		if err != nil {
			return ""
		}
		return string(b)
	}
	funcs["required"] = func(msg string, v interface{}) (interface{}, error) {
		if v == nil {
			return nil, errors.New(msg)
		}
		if s, ok := v.(string); ok && s == "" {
			return nil, errors.New(msg)
		}
		return v, nil
	}
	funcs["fail"] = func(msg string) (string, error) { return "", errors.New(msg) }
	funcs["lookup"] = func(string, string, string, string) map[string]interface{} {
		return map[string]interface{}{}
	}
	funcs["include"] = func(name string, data interface{}) (string, error) {
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, name, data); err != nil {
			return "", err
		}
		return buf.String(), nil
	}
	funcs["tpl"] = func(text string, data interface{}) (string, error) {
		t, err := root.Clone()
		if err != nil {
			return "", err
		}
		t, err = t.New("tpl").Parse(text)
		if err != nil {
			return "", err
		}
		var buf bytes.Buffer
		if err := t.Execute(&buf, data); err != nil {
			return "", err
		}
		return buf.String(), nil
	}
	root.Funcs(funcs).Option("missingkey=zero")

	files, err := filepath.Glob(filepath.Join(chartDir, "templates", "*"))
	if err != nil {
		return err
	}
	sort.Strings(files)
	var names []string
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		tname := path.Join(basePath, filepath.Base(f))
		if _, err := root.New(tname).Parse(string(data)); err != nil {
			return err
		}
		names = append(names, tname)
	}

	versions := APIVersions{"v1", "apps/v1", "autoscaling/v2", "policy/v1", "networking.k8s.io/v1"}
	versions = append(versions, apiVersions...)
	out := output{Values: values, Manifests: []manifest{}}
	for _, tname := range names {
		base := path.Base(tname)
		if strings.HasPrefix(base, "_") {
			continue
		}
		data := map[string]interface{}{
			"Values": values,
			"Release": map[string]interface{}{
				"Name": *name, "Namespace": *namespace, "Service": "Helm",
				"IsInstall": true, "IsUpgrade": false, "Revision": 1,
			},
			"Chart": map[string]interface{}{
				"Name": chart["name"], "Version": chart["version"], "AppVersion": chart["appVersion"],
			},
			"Capabilities": map[string]interface{}{
				"APIVersions": versions,
				"KubeVersion": map[string]interface{}{"Version": "v1.31.0", "Major": "1", "Minor": "31"},
			},
			"Template": map[string]interface{}{"Name": tname, "BasePath": basePath},
		}
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, tname, data); err != nil {
			return err
		}
		text := strings.ReplaceAll(buf.String(), "<no value>", "")
		if base == "NOTES.txt" {
			out.Notes = text
			continue
		}
		dec := yaml.NewDecoder(strings.NewReader(text))
		for {
			var obj map[string]interface{}
			err := dec.Decode(&obj)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return fmt.Errorf("%s: rendered YAML does not parse: %w\n%s", tname, err, text)
			}
			if obj != nil {
				out.Manifests = append(out.Manifests, manifest{Template: tname, Object: obj})
			}
		}
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", " ")
	return enc.Encode(out)
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "render:", err)
		os.Exit(1)
	}
}
