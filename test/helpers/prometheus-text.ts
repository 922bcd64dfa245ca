/** One sample line of the Prometheus text format. */
export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** A metric family: its # HELP and # TYPE and the samples under them. */
export interface MetricFamily {
  name: string;
  help: string;
  type: 'counter' | 'gauge' | 'histogram' | 'summary' | 'untyped';
  samples: Sample[];
}

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;
const TYPES = new Set(['counter', 'gauge', 'histogram', 'summary', 'untyped']);

/**
 * Parses Prometheus text exposition format 0.0.4 strictly enough to catch
 * what a scraper would reject: bad names, bad label syntax, unparsable
 * values, samples without a TYPE, families split in two, histograms whose
 * buckets do not add up. Throws with the line number on the first problem.
 */
export function parsePrometheusText(text: string): Map<string, MetricFamily> {
  const families = new Map<string, MetricFamily>();
  let current: MetricFamily | undefined;
  const lines = text.split('\n');
  if (lines.at(-1) !== '') throw new Error('the exposition must end with a newline');
  lines.forEach((line, index) => {
    const where = `line ${index + 1} (${JSON.stringify(line.slice(0, 80))})`;
    if (line === '') return;
    if (line.startsWith('#')) {
      const match = /^# (HELP|TYPE) (\S+) ?(.*)$/.exec(line);
      if (!match) return; // an ordinary comment
      const [, keyword, name, rest] = match as unknown as [string, 'HELP' | 'TYPE', string, string];
      if (!METRIC_NAME.test(name)) throw new Error(`${where}: '${name}' is not a metric name`);
      let family = families.get(name);
      if (family && current !== family) throw new Error(`${where}: metric family ${name} appears twice`);
      if (!family) {
        family = { name, help: '', type: 'untyped', samples: [] };
        families.set(name, family);
      }
      current = family;
      if (keyword === 'HELP') family.help = rest;
      else {
        if (!TYPES.has(rest)) throw new Error(`${where}: '${rest}' is not a metric type`);
        if (family.samples.length > 0) throw new Error(`${where}: TYPE of ${name} comes after its samples`);
        family.type = rest as MetricFamily['type'];
      }
      return;
    }
    const sample = parseSample(line, where);
    if (!current || !belongsTo(sample.name, current)) {
      throw new Error(`${where}: sample ${sample.name} does not follow a # TYPE line of its family`);
    }
    current.samples.push(sample);
  });
  for (const family of families.values()) if (family.type === 'histogram') checkHistogram(family);
  return families;
}

function belongsTo(sampleName: string, family: MetricFamily): boolean {
  if (sampleName === family.name) return family.type !== 'histogram';
  const suffixes = family.type === 'histogram' ? ['_bucket', '_sum', '_count'] : family.type === 'summary' ? ['_sum', '_count'] : [];
  return suffixes.some((suffix) => sampleName === family.name + suffix);
}

function parseSample(line: string, where: string): Sample {
  const nameMatch = /^[a-zA-Z_:][a-zA-Z0-9_:]*/.exec(line);
  if (!nameMatch) throw new Error(`${where}: no metric name`);
  const name = nameMatch[0];
  let rest = line.slice(name.length);
  const labels: Record<string, string> = {};
  if (rest.startsWith('{')) {
    rest = rest.slice(1);
    while (!rest.startsWith('}')) {
      const labelMatch = /^([^=\s]+)="/.exec(rest);
      if (!labelMatch) throw new Error(`${where}: malformed label`);
      const labelName = labelMatch[1] as string;
      if (!LABEL_NAME.test(labelName)) throw new Error(`${where}: '${labelName}' is not a label name`);
      if (labelName in labels) throw new Error(`${where}: label ${labelName} repeated`);
      rest = rest.slice(labelMatch[0].length);
      let value = '';
      while (true) {
        const char = rest[0];
        if (char === undefined) throw new Error(`${where}: unterminated label value`);
        if (char === '"') break;
        if (char === '\\') {
          const escaped = rest[1];
          if (escaped === 'n') value += '\n';
          else if (escaped === '\\' || escaped === '"') value += escaped;
          else throw new Error(`${where}: bad escape \\${escaped ?? ''} in a label value`);
          rest = rest.slice(2);
        } else {
          value += char;
          rest = rest.slice(1);
        }
      }
      labels[labelName] = value;
      rest = rest.slice(1);
      if (rest.startsWith(',')) rest = rest.slice(1);
      else if (!rest.startsWith('}')) throw new Error(`${where}: expected ',' or '}' after a label`);
    }
    rest = rest.slice(1);
  }
  const valueMatch = /^ (\S+)( -?\d+)?$/.exec(rest);
  if (!valueMatch) throw new Error(`${where}: expected ' value [timestamp]' after the name and labels`);
  return { name, labels, value: parseValue(valueMatch[1] as string, where) };
}

/** A value as Go's strconv.ParseFloat reads it, which is what Prometheus uses: special values in any case ("Nan" from prom-client too). */
function parseValue(raw: string, where: string): number {
  if (/^\+?inf(inity)?$/i.test(raw)) return Number.POSITIVE_INFINITY;
  if (/^-inf(inity)?$/i.test(raw)) return Number.NEGATIVE_INFINITY;
  if (/^nan$/i.test(raw)) return Number.NaN;
  if (!/^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(raw)) throw new Error(`${where}: '${raw}' is not a number`);
  return Number(raw);
}

/** Buckets are cumulative and the +Inf bucket equals _count, per label set. */
function checkHistogram(family: MetricFamily): void {
  const series = new Map<string, { buckets: { le: number; value: number }[]; count?: number }>();
  const keyOf = (labels: Record<string, string>) =>
    JSON.stringify(
      Object.entries(labels)
        .filter(([name]) => name !== 'le')
        .sort(),
    );
  for (const sample of family.samples) {
    const key = keyOf(sample.labels);
    const entry = series.get(key) ?? { buckets: [] };
    series.set(key, entry);
    if (sample.name.endsWith('_bucket')) {
      const le = sample.labels.le;
      if (le === undefined) throw new Error(`${family.name}: a bucket without le`);
      entry.buckets.push({ le: parseValue(le, family.name), value: sample.value });
    } else if (sample.name.endsWith('_count')) entry.count = sample.value;
  }
  for (const [key, entry] of series) {
    const last = entry.buckets.at(-1);
    if (!last || last.le !== Number.POSITIVE_INFINITY) throw new Error(`${family.name}${key}: no +Inf bucket`);
    entry.buckets.forEach((bucket, i) => {
      const previous = entry.buckets[i - 1];
      if (previous && (bucket.le <= previous.le || bucket.value < previous.value)) {
        throw new Error(`${family.name}${key}: buckets not cumulative at le=${bucket.le}`);
      }
    });
    if (entry.count !== last.value)
      throw new Error(`${family.name}${key}: _count ${entry.count} differs from the +Inf bucket ${last.value}`);
  }
}

/** The samples of a family whose labels include every given label. */
export function samplesOf(families: Map<string, MetricFamily>, name: string, labels: Record<string, string> = {}): Sample[] {
  const sampleFamily = families.get(name) ?? families.get(name.replace(/_(bucket|sum|count)$/, ''));
  if (!sampleFamily) return [];
  return sampleFamily.samples.filter(
    (sample) => sample.name === name && Object.entries(labels).every(([key, value]) => sample.labels[key] === value),
  );
}

/** The value of the one sample of `name` with these labels; throws if there is not exactly one. */
export function sampleValue(families: Map<string, MetricFamily>, name: string, labels: Record<string, string> = {}): number {
  const samples = samplesOf(families, name, labels);
  if (samples.length !== 1) throw new Error(`expected one sample of ${name}${JSON.stringify(labels)}, found ${samples.length}`);
  return (samples[0] as Sample).value;
}
